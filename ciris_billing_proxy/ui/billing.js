// The billing UI kit: a client for an agent's billing routes and the <ciris-billing> element built on it.
// A plain ES module with no dependencies and no build step; served by ciris-billing-proxy at
// {prefix}/ui/billing.js, with TypeScript declarations beside it at {prefix}/ui/billing.d.ts.

export const DEFAULT_PREFIX = "/v1/api/billing";
export const DEFAULT_TOOLS_PREFIX = "/v1/api/tools";
export const DEFAULT_STRIPE_JS = "https://js.stripe.com/v3/";
export const STATES = Object.freeze([
  "loading", "ready", "no-credit", "disabled", "paying", "processing", "succeeded", "failed", "error",
]);

// -- errors: the same classes, statuses and names as the Python client ------------------------------

export class BillingClientError extends Error {
  constructor(message) {
    super(message);
    this.name = new.target.name;
  }
}

/** The agent could not be reached. */
export class BillingConnectionError extends BillingClientError {}

/** The agent answers, but not to this page: its CORS settings (`cors_origins`) leave this origin out. */
export class OriginNotAllowedError extends BillingClientError {
  constructor(origin) {
    super(`the agent does not allow this page's origin (${origin})`);
    this.origin = origin;
  }
}

/** A success reply that does not fit the billing contract. */
export class InvalidReplyError extends BillingClientError {}

/** The agent answered an error status; `detail` is its `{"detail": ...}` (or a summary of the body). */
export class BillingAPIError extends BillingClientError {
  constructor(status, detail) {
    super(`HTTP ${status}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
    this.status = status;
    this.detail = detail;
  }
}
export class InvalidRequestError extends BillingAPIError {}
export class AuthenticationError extends BillingAPIError {}
export class InsufficientCreditError extends BillingAPIError {}
export class BillingNotEnabled extends BillingAPIError {}
export class ForbiddenError extends BillingAPIError {}
export class NotFoundError extends BillingAPIError {}
export class RateLimitedError extends BillingAPIError {}
export class ServiceUnavailableError extends BillingAPIError {}

/** The payment ended as `failed` or `canceled`; `purchase` is the last status reply. */
export class PurchaseFailed extends BillingClientError {
  constructor(purchase) {
    super(`payment ${purchase.status}`);
    this.purchase = purchase;
  }
}

/** The payment did not settle in time, or the agent says its state is `unknown`. */
export class PurchaseTimeout extends BillingClientError {
  constructor(last, attempts, error = null) {
    super(last ? `payment still ${last.status} after ${attempts} attempts` : `payment unknown after ${attempts} attempts`);
    this.last = last;
    this.error = error;
  }
}

export function errorFor(status, detail) {
  if (status === 401) return new AuthenticationError(status, detail);
  if (status === 402) return new InsufficientCreditError(status, detail);
  if (status === 403) {
    const billingOff = typeof detail === "string" && detail.toLowerCase().includes("billing not enabled");
    return billingOff ? new BillingNotEnabled(status, detail) : new ForbiddenError(status, detail);
  }
  if (status === 404) return new NotFoundError(status, detail);
  if (status === 429) return new RateLimitedError(status, detail);
  if (status >= 500) return new ServiceUnavailableError(status, detail);
  if (status === 400 || status === 413 || status === 422) return new InvalidRequestError(status, detail);
  return new BillingAPIError(status, detail);
}

/** Errors after which asking again later may work. */
export function isTransient(error) {
  return error instanceof ServiceUnavailableError || error instanceof RateLimitedError
    || error instanceof BillingConnectionError;
}

// -- the client ------------------------------------------------------------------------------------

const sleep = (ms, signal) => new Promise((resolve, reject) => {
  if (signal?.aborted) return reject(signal.reason);
  const timer = setTimeout(resolve, ms);
  signal?.addEventListener("abort", () => { clearTimeout(timer); reject(signal.reason); }, { once: true });
});

const REPLY_FIELDS = {
  credits: { has_credit: "boolean", credits_remaining: "number", free_uses_remaining: "number", purchase_required: "boolean" },
  capabilities: { provider: "string", purchases: "boolean", transactions: "boolean" },
  initiated: { payment_id: "string", client_secret: "string", amount_minor: "number", currency: "string", uses_purchased: "number" },
  status: { status: "string" },
  transactions: { transactions: "object", total_count: "number", has_more: "boolean" },
  toolBalance: { product_type: "string", free_remaining: "number", paid_credits: "number", total_available: "number", total_uses: "number" },
  toolBalances: { balances: "object" },
  toolCheck: { has_credit: "boolean", product_type: "string", total_available: "number" },
  availableTools: { tools: "object", platform: "string", has_google_auth: "boolean" },
  toolPurchase: { success: "boolean", product_type: "string", credits_added: "number", new_balance: "number", message: "string" },
};

function checked(kind, body, what) {
  for (const [field, type] of Object.entries(REPLY_FIELDS[kind])) {
    if (typeof body[field] !== type || body[field] === null) {
      throw new InvalidReplyError(`${what} answered without a valid ${field}`);
    }
  }
  return body;
}

export class BillingClient {
  /**
   * @param {object} options
   * @param {string} [options.apiBase] the agent's base URL (default: this page's origin)
   * @param {string} [options.prefix] where the billing routes live (default /v1/api/billing)
   * @param {string|(() => string|Promise<string>)} [options.token] a token, or a function giving one
   * @param {string} [options.toolsPrefix] where the tool routes live (default /v1/api/tools)
   */
  constructor({ apiBase, prefix = DEFAULT_PREFIX, token = null, fetch: fetcher, toolsPrefix = DEFAULT_TOOLS_PREFIX } = {}) {
    this.apiBase = (apiBase || globalThis.location?.origin || "").replace(/\/+$/, "");
    this.prefix = prefix.replace(/\/+$/, "");
    this.toolsPrefix = toolsPrefix.replace(/\/+$/, "");
    this.token = token;
    this._fetch = fetcher || globalThis.fetch.bind(globalThis);
  }

  async getCredits() {
    return checked("credits", await this.request("GET", "/credits"), "credits");
  }

  /** What the provider offers; agents older than the route answer 404 (`NotFoundError`). */
  async getCapabilities() {
    const body = checked("capabilities", await this.request("GET", "/capabilities"), "capabilities");
    // Agents from before the app store routes leave these out: no stores, and the gate charges.
    return { google_play: false, apple_storekit: false, charges: true, ...body };
  }

  async initiatePurchase({ returnUrl, idempotencyKey, pack } = {}) {
    const headers = idempotencyKey ? { "Idempotency-Key": idempotencyKey } : {};
    const body = { ...(returnUrl ? { return_url: returnUrl } : {}), ...(pack ? { pack } : {}) };
    return checked("initiated", await this.request("POST", "/purchase/initiate", { body, headers }), "purchase/initiate");
  }

  async getPurchaseStatus(paymentId) {
    return checked("status", await this.request("GET", `/purchase/status/${encodeURIComponent(paymentId)}`), "purchase/status");
  }

  /**
   * Poll until the payment settles: resolves with the `succeeded` reply, rejects `PurchaseFailed` on
   * `failed`/`canceled` and `PurchaseTimeout` on `unknown` or when `timeoutMs` has passed. Waits grow
   * from `intervalMs` to `maxIntervalMs`; a poll meeting a passing fault (5xx, 429, no connection)
   * counts and polling goes on; any other error is thrown at once.
   */
  async waitForPurchase(paymentId, { intervalMs = 1000, maxIntervalMs = 5000, timeoutMs = 120000, onPoll, signal } = {}) {
    const deadline = Date.now() + timeoutMs;
    let wait = intervalMs;
    let last = null;
    let error = null;
    for (let attempt = 1; ; attempt += 1) {
      try {
        last = await this.getPurchaseStatus(paymentId);
        error = null;
      } catch (exc) {
        if (!isTransient(exc)) throw exc;
        error = exc;
      }
      onPoll?.(attempt, error ? null : last);
      if (!error) {
        if (last.status === "succeeded") return last;
        if (last.status === "failed" || last.status === "canceled") throw new PurchaseFailed(last);
        if (last.status === "unknown") throw new PurchaseTimeout(last, attempt);
      }
      if (Date.now() + wait > deadline) throw new PurchaseTimeout(last, attempt, error);
      await sleep(wait, signal);
      wait = Math.min(wait * 1.5, maxIntervalMs);
    }
  }

  async getTransactions({ limit = 50, offset = 0 } = {}) {
    const query = new URLSearchParams({ limit: String(limit), offset: String(offset) });
    return checked("transactions", await this.request("GET", `/transactions?${query}`), "transactions");
  }

  /**
   * After a failed call from another origin: whether the agent is up and only CORS kept its reply from
   * this page. A browser hides the difference from `fetch`, but a `no-cors` request, whose reply the
   * page cannot read, still fails only when nothing answers.
   */
  async #refusedOrigin() {
    const here = globalThis.location?.origin;
    let target;
    try {
      target = new URL(this.apiBase || here).origin;
    } catch {
      return false;
    }
    if (!here || here === "null" || target === here) return false;
    try {
      await this._fetch(`${this.apiBase}${this.prefix}/capabilities`, { mode: "no-cors", cache: "no-store" });
      return true;
    } catch {
      return false;
    }
  }

  // -- tool credits (per-product balances, docs/tool-credits.md), under `toolsPrefix` --------------
  async getToolBalance(tool) {
    return checked("toolBalance", await this.#tools("GET", `/balance/${encodeURIComponent(tool)}`), "tools/balance");
  }

  async getToolBalances() {
    return checked("toolBalances", await this.#tools("GET", "/balance"), "tools/balance");
  }

  async checkTool(tool) {
    return checked("toolCheck", await this.#tools("GET", `/check/${encodeURIComponent(tool)}`), "tools/check");
  }

  async getAvailableTools() {
    return checked("availableTools", await this.#tools("GET", "/available"), "tools/available");
  }

  /** Redeem a store purchase of a tool pack; a repeat is a `BillingAPIError` with status 409. */
  async purchaseTool({ productId, purchaseToken, toolName }) {
    const body = { product_id: productId, purchase_token: purchaseToken, tool_name: toolName };
    return checked("toolPurchase", await this.#tools("POST", "/purchase", { body }), "tools/purchase");
  }

  #tools(method, path, options = {}) {
    return this.request(method, path, { ...options, prefix: this.toolsPrefix });
  }

  /** One call under the prefix (or another given as `prefix`): the JSON object of a 2xx reply, or a typed error. */
  async request(method, path, { body, headers = {}, prefix = this.prefix } = {}) {
    const all = { ...headers };
    const token = typeof this.token === "function" ? await this.token() : this.token;
    if (token) all.Authorization = `Bearer ${token}`;
    if (body !== undefined) all["Content-Type"] = "application/json";
    let response;
    let text;
    try {
      response = await this._fetch(`${this.apiBase}${prefix}${path}`, {
        method, headers: all, body: body === undefined ? undefined : JSON.stringify(body),
      });
      text = await response.text();
    } catch (exc) {
      if (await this.#refusedOrigin()) throw new OriginNotAllowedError(globalThis.location.origin);
      throw new BillingConnectionError(`cannot reach the agent: ${exc?.message || exc}`);
    }
    let parsed;
    try {
      parsed = text ? JSON.parse(text) : null;
    } catch {
      parsed = `${response.headers.get("Content-Type") || "unknown type"} reply of ${text.length} characters`;
    }
    if (parsed && typeof parsed === "object" && !Array.isArray(parsed)) {
      const keys = Object.keys(parsed);
      if (keys.length === 1 && keys[0] === "data" && parsed.data && typeof parsed.data === "object") parsed = parsed.data;
    }
    if (!response.ok) {
      const detail = parsed && typeof parsed === "object" && "detail" in parsed ? parsed.detail : parsed;
      throw errorFor(response.status, detail);
    }
    if (!parsed || typeof parsed !== "object" || Array.isArray(parsed)) {
      throw new InvalidReplyError(`${method} ${path} answered ${response.status} without a JSON object`);
    }
    return parsed;
  }
}

// -- formatting ------------------------------------------------------------------------------------

export function formatMoney(minor, currency) {
  try {
    const format = new Intl.NumberFormat(undefined, { style: "currency", currency });
    const digits = format.resolvedOptions().maximumFractionDigits;
    return format.format(minor / 10 ** digits);
  } catch {
    return `${(minor / 100).toFixed(2)} ${currency}`;
  }
}

const plural = (n, one, many) => `${n} ${n === 1 ? one : many}`;

function detailText(error) {
  const detail = error?.detail;
  if (typeof detail === "string") return detail;
  if (detail && typeof detail === "object" && typeof detail.message === "string") return detail.message;
  return error?.message || "Something went wrong";
}

// -- Stripe.js -------------------------------------------------------------------------------------

const stripeLoads = new Map();

/** Load Stripe.js (or a stand-in with the same calls) once per URL; resolves with `window.Stripe`. */
export function loadStripe(url = DEFAULT_STRIPE_JS) {
  if (globalThis.Stripe) return Promise.resolve(globalThis.Stripe);
  if (!stripeLoads.has(url)) {
    stripeLoads.set(url, new Promise((resolve, reject) => {
      const script = document.createElement("script");
      script.src = url;
      script.async = true;
      script.addEventListener("load", () => (globalThis.Stripe ? resolve(globalThis.Stripe) : reject(new Error("Stripe.js did not load"))));
      script.addEventListener("error", () => { stripeLoads.delete(url); reject(new Error("Stripe.js could not be loaded")); });
      document.head.append(script);
    }));
  }
  return stripeLoads.get(url);
}

// -- the element -----------------------------------------------------------------------------------

const STYLE = `
:host {
  --_font: var(--ciris-billing-font, system-ui, -apple-system, "Segoe UI", Roboto, sans-serif);
  --_text: var(--ciris-billing-text, #1f2933);
  --_muted: var(--ciris-billing-muted, #52606d);
  --_background: var(--ciris-billing-background, #ffffff);
  --_surface: var(--ciris-billing-surface, #f5f7fa);
  --_border: var(--ciris-billing-border, #d9e2ec);
  --_accent: var(--ciris-billing-accent, #3949ab);
  --_accent-text: var(--ciris-billing-accent-text, #ffffff);
  --_success: var(--ciris-billing-success, #1b7a46);
  --_error: var(--ciris-billing-error, #b42318);
  --_warning: var(--ciris-billing-warning, #8a4b00);
  --_radius: var(--ciris-billing-radius, 10px);
  display: block;
  /* Its width comes from the page, never from its content: as wide as there is room, up to 32rem
     (a flex or grid item too, which the container below would otherwise shrink to nothing). */
  width: 100%;
  max-width: 32rem;
  min-width: 0;
  /* The history reflows by the element's own width (a sidebar is narrow on any screen). */
  container-type: inline-size;
  font-family: var(--_font);
  color: var(--_text);
  line-height: 1.45;
}
:host([hidden]) { display: none; }
* { box-sizing: border-box; }
.card {
  background: var(--_background);
  border: 1px solid var(--_border);
  border-radius: var(--_radius);
  padding: 1.25rem 1.5rem;
  display: grid;
  gap: 1rem;
}
h2, h3 { margin: 0; font-weight: 600; }
h2 { font-size: 0.8rem; text-transform: uppercase; letter-spacing: 0.06em; color: var(--_muted); }
h3 { font-size: 0.95rem; }
.total { font-size: 2.25rem; font-weight: 700; line-height: 1.1; font-variant-numeric: tabular-nums; }
.total small { font-size: 1rem; font-weight: 500; color: var(--_muted); margin-left: 0.35rem; }
.breakdown { margin: 0.35rem 0 0; padding: 0; list-style: none; display: flex; flex-wrap: wrap; gap: 0.4rem; }
.breakdown li { background: var(--_surface); border-radius: 999px; padding: 0.15rem 0.65rem; font-size: 0.85rem; color: var(--_muted); }
.breakdown b { color: var(--_text); font-variant-numeric: tabular-nums; }
button {
  font: inherit;
  font-weight: 600;
  border-radius: calc(var(--_radius) * 0.7);
  padding: 0.6rem 1.1rem;
  cursor: pointer;
  border: 1px solid var(--_border);
  background: var(--_background);
  color: var(--_text);
}
.buy { justify-self: start; }
.low-balance {
  margin: 0;
  padding: 0.6rem 0.9rem;
  border-radius: calc(var(--_radius) * 0.7);
  border: 1px solid color-mix(in srgb, var(--_warning) 35%, var(--_background));
  background: color-mix(in srgb, var(--_warning) 9%, var(--_background));
  color: var(--_warning);
  font-size: 0.95rem;
  overflow-wrap: anywhere;
}
.low-balance strong { font-weight: 600; }
select.packs { font: inherit; justify-self: start; max-width: 100%; padding: 0.5rem 0.6rem; border: 1px solid var(--_border); border-radius: calc(var(--_radius) * 0.7); background: var(--_background); color: var(--_text); }
button.primary { background: var(--_accent); border-color: var(--_accent); color: var(--_accent-text); }
button:hover:not(:disabled) { filter: brightness(0.95); }
button:focus-visible { outline: 3px solid var(--_accent); outline-offset: 2px; }
button:disabled { opacity: 0.6; cursor: progress; }
button.link { border: none; background: none; padding: 0.25rem 0.4rem; color: var(--_accent); font-weight: 500; }
button.link:disabled { opacity: 0.4; cursor: default; }
[hidden] { display: none !important; }
.row { display: flex; flex-wrap: wrap; gap: 0.6rem; align-items: center; }
.payment { display: grid; gap: 0.6rem; border-top: 1px solid var(--_border); padding-top: 1rem; }
.payment p { margin: 0; }
.card-error { color: var(--_error); font-size: 0.9rem; min-height: 1.3em; margin-top: -0.2rem; }
.status {
  display: flex;
  gap: 0.6rem;
  align-items: flex-start;
  min-height: 3rem;
  padding: 0.7rem 0.9rem;
  border-radius: calc(var(--_radius) * 0.7);
  background: var(--_surface);
  font-size: 0.95rem;
}
.status p { margin: 0; }
:host([state="succeeded"]) .status { background: color-mix(in srgb, var(--_success) 12%, var(--_background)); color: var(--_success); }
:host([state="failed"]) .status, :host([state="error"]) .status { background: color-mix(in srgb, var(--_error) 10%, var(--_background)); color: var(--_error); }
.spinner {
  flex: none;
  width: 1.1rem;
  height: 1.1rem;
  margin-top: 0.15rem;
  border: 2px solid var(--_border);
  border-top-color: var(--_accent);
  border-radius: 50%;
  display: none;
}
:host([state="loading"]) .spinner, :host([state="processing"]) .spinner, .status.busy .spinner { display: block; animation: spin 0.9s linear infinite; }
@keyframes spin { to { transform: rotate(360deg); } }
@media (prefers-reduced-motion: reduce) { .spinner { animation: none !important; } }
.history { border-top: 1px solid var(--_border); padding-top: 1rem; display: grid; gap: 0.5rem; }
table { width: 100%; border-collapse: collapse; font-size: 0.875rem; font-variant-numeric: tabular-nums; }
th { text-align: left; font-weight: 500; color: var(--_muted); padding: 0.3rem 0.4rem; border-bottom: 1px solid var(--_border); }
td { padding: 0.4rem; border-bottom: 1px solid var(--_surface); vertical-align: top; }
td.amount, th.amount, td.balance, th.balance { text-align: right; white-space: nowrap; }
td.amount.credit { color: var(--_success); font-weight: 600; }
td.when { white-space: nowrap; color: var(--_muted); }
.pager { justify-content: space-between; font-size: 0.85rem; color: var(--_muted); }
.empty { color: var(--_muted); font-size: 0.9rem; margin: 0; }
button, .message, td.what { overflow-wrap: anywhere; }
/* Narrow: each entry is two lines, date and description on the left, uses and balance on the right. */
@container (max-width: 28rem) {
  .card { padding: 1rem; }
  table, tbody { display: block; }
  thead { display: none; }
  tr { display: grid; grid-template-columns: minmax(0, 1fr) auto; column-gap: 0.75rem; padding: 0.45rem 0; border-bottom: 1px solid var(--_surface); }
  td { padding: 0; border: none; }
  td.when { grid-area: 1 / 1; white-space: normal; font-size: 0.8rem; }
  td.what { grid-area: 2 / 1; }
  td.amount { grid-area: 1 / 2; }
  td.balance { grid-area: 2 / 2; color: var(--_muted); font-size: 0.8rem; }
  td.amount::after, td.balance::before { content: attr(data-label); color: var(--_muted); font-weight: 400; }
}
`;

const TEMPLATE = `
<div class="card">
  <section part="balance" class="balance" aria-label="Balance">
    <h2>Uses left</h2>
    <div class="total"><span class="number">–</span><small class="unit"></small></div>
    <ul class="breakdown"></ul>
  </section>
  <p part="low-balance" class="low-balance" role="status" hidden></p>
  <select part="packs" class="packs" aria-label="Pack to buy" hidden></select>
  <button part="buy" type="button" class="primary buy" hidden>Buy credits</button>
  <form part="payment" class="payment" hidden novalidate>
    <p class="summary"></p>
    <slot name="card-element"></slot>
    <div class="card-error" role="alert"></div>
    <div class="row">
      <button part="pay" type="submit" class="primary pay">Pay</button>
      <button type="button" class="cancel">Cancel</button>
    </div>
  </form>
  <div part="status" class="status" role="status" aria-live="polite"><span class="spinner" aria-hidden="true"></span><p class="message"></p></div>
  <div class="row followup" hidden><button type="button" class="primary again"></button><button type="button" class="dismiss" hidden>Cancel</button></div>
  <section part="history" class="history" aria-label="History" hidden>
    <h3>History</h3>
    <table>
      <thead><tr><th scope="col">Date</th><th scope="col">Description</th><th scope="col" class="amount">Uses</th><th scope="col" class="balance">Uses left</th></tr></thead>
      <tbody></tbody>
    </table>
    <p class="empty" hidden>No transactions yet.</p>
    <div class="row pager"><button type="button" class="link newer">← Newer</button><span class="range"></span><button type="button" class="link older">Older →</button></div>
  </section>
</div>`;

const HISTORY_PAGE = 5;
// What a history entry's `balance_after` counts, by `capabilities.provider` (docs/ui-kit.md): the
// CIRIS billing backend reports the paid credits left, its free uses a separate allowance; the
// grants ledger (`simple`, `stripe`) every use left, free and paid. Of another provider the element
// cannot tell, so its label claims neither.
const BALANCE_LABELS = new Map([["ciris", "Paid left"], ["simple", "Uses left"], ["stripe", "Uses left"]]);
const BALANCE_LABEL = "Balance after";
const CARD_NEEDED = "Enter your card details.";
const RETRY_SECONDS = [2, 4, 8, 15, 30];

export class CirisBillingElement extends HTMLElement {
  static get observedAttributes() { return ["api-base", "prefix", "product", "tools-prefix"]; }

  #token = null;
  #tokenProvider = null;
  #client = null;
  #capabilities = null;
  #credits = null;
  #purchase = null;
  #stripe = null;
  #card = null;
  #cardHost = null;
  #historyOffset = 0;
  #retries = 0;
  #retryTimer = null;
  #followup = null;
  #run = 0;
  #abort = null;
  #hadFocus = false;

  constructor() {
    super();
    this.attachShadow({ mode: "open" }).innerHTML = `<style>${STYLE}</style>${TEMPLATE}`;
    this.#q(".buy").addEventListener("click", () => this.#buy());
    this.#q(".packs").addEventListener("change", () => this.#renderBalance());
    this.#q(".payment").addEventListener("submit", (event) => { event.preventDefault(); this.#pay(); });
    this.#q(".cancel").addEventListener("click", () => this.#cancelPayment());
    this.#q(".again").addEventListener("click", () => this.#followup?.());
    this.#q(".dismiss").addEventListener("click", () => this.#backToBalance());
    this.#q(".newer").addEventListener("click", () => this.#loadHistory(Math.max(0, this.#historyOffset - HISTORY_PAGE)));
    this.#q(".older").addEventListener("click", () => this.#loadHistory(this.#historyOffset + HISTORY_PAGE));
  }

  #q(selector) { return this.shadowRoot.querySelector(selector); }

  /** The bearer token; setting it (re)loads the element. */
  get token() { return this.#token; }
  set token(value) {
    this.#token = value || null;
    this.#restart();
  }

  /** A function giving a token (sync or async), asked before each call; wins over `token`. */
  get tokenProvider() { return this.#tokenProvider; }
  set tokenProvider(value) {
    this.#tokenProvider = typeof value === "function" ? value : null;
    this.#restart();
  }

  get client() { return this.#client; }
  get credits() { return this.#credits; }
  get capabilities() { return this.#capabilities; }
  get state() { return this.getAttribute("state"); }

  connectedCallback() {
    // A token set before this module loaded is an own property hiding the accessors: move it over.
    for (const name of ["token", "tokenProvider"]) {
      if (Object.hasOwn(this, name)) {
        const value = this[name];
        delete this[name];
        this[name] = value;
      }
    }
    if (!this.hasAttribute("state")) this.#restart();
  }

  disconnectedCallback() {
    this.#stop();
    this.removeAttribute("state");
  }

  attributeChangedCallback(_name, before, after) {
    if (before !== after && this.isConnected && this.hasAttribute("state")) this.#restart();
  }

  /** Read the balance (and history) again, e.g. after the host app spent a use. */
  async refresh() {
    if (["loading", "error"].includes(this.state)) return this.#restart();
    return this.#refreshQuietly();
  }

  // -- lifecycle -----------------------------------------------------------------------------------

  #stop() {
    this.#run += 1;
    clearTimeout(this.#retryTimer);
    this.#abort?.abort();
    this.#abort = new AbortController();
    this.#destroyCard();
  }

  #restart() {
    if (!this.isConnected) return;
    this.#stop();
    const tokenProvider = this.#tokenProvider;
    this.#client = new BillingClient({
      apiBase: this.getAttribute("api-base") || undefined,
      prefix: this.getAttribute("prefix") || DEFAULT_PREFIX,
      toolsPrefix: this.getAttribute("tools-prefix") || DEFAULT_TOOLS_PREFIX,
      token: tokenProvider || (() => this.#token),
    });
    const run = this.#run;
    if (tokenProvider || this.#token) {
      this.#start(run);
      return;
    }
    this.#setState("loading", "Waiting for sign-in…");
    this.#renderBalance();
    // Not at once: a host that sets the token right after adding the element has not had its turn.
    this.#retryTimer = setTimeout(() => {
      if (run === this.#run) this.#unauthorized(new AuthenticationError(401, "Not authenticated"));
    }, 0);
  }

  async #start(run) {
    this.#setState("loading", "Loading your balance…");
    this.#renderBalance();
    try {
      const product = this.getAttribute("product");
      const [capabilities, credits] = product
        ? await this.#productView(product)
        : await Promise.all([this.#readCapabilities(), this.#client.getCredits()]);
      if (run !== this.#run) return;
      this.#capabilities = capabilities;
      this.#credits = credits;
      this.#retries = 0;
      this.#backToBalance();
      if (capabilities.transactions) await this.#loadHistory(0);
    } catch (error) {
      if (run === this.#run) this.#failLoading(error, run);
    }
  }

  async #readCapabilities() {
    try {
      return await this.#client.getCapabilities();
    } catch (error) {
      // Agents older than the route: the purchase routes themselves tell (403) when buying is off.
      if (error instanceof NotFoundError) return { provider: "unknown", purchases: true, transactions: true };
      throw error;
    }
  }

  #failLoading(error, run) {
    if (this.#unauthorized(error)) return;
    if (error instanceof OriginNotAllowedError) {
      // Not an outage: asking again changes nothing until the agent's operator allows this origin.
      this.#setState("error", `The agent does not allow this page's origin (${error.origin}) to use billing. `
        + "Its operator can add it to the agent's cors_origins.");
      this.#offer("Try again", () => this.#restart());
      return;
    }
    if (isTransient(error)) {
      const seconds = RETRY_SECONDS[Math.min(this.#retries, RETRY_SECONDS.length - 1)];
      this.#retries += 1;
      this.#setState("error", `Billing is temporarily unavailable. Trying again in ${plural(seconds, "second", "seconds")}…`, { busy: true });
      this.#offer("Try now", () => this.#restart());
      this.#retryTimer = setTimeout(() => { if (run === this.#run) this.#start(run); }, seconds * 1000);
      return;
    }
    this.#setState("error", `Could not load your balance: ${detailText(error)}`);
    this.#offer("Try again", () => this.#restart());
  }

  #unauthorized(error) {
    if (!(error instanceof AuthenticationError)) return false;
    this.#stop();
    this.#setState("error", "Your session has ended. Please sign in again.");
    this.#renderBalance();
    this.#offer(null);
    this.dispatchEvent(new CustomEvent("ciris-billing:unauthorized", { bubbles: true, composed: true, detail: { status: 401, detail: error.detail } }));
    return true;
  }

  // -- balance and history ---------------------------------------------------------------------------

  #backToBalance() {
    this.#destroyCard();
    this.#purchase = null;
    this.#offer(null);
    const credits = this.#credits;
    if (!credits) return this.#restart();
    const total = credits.credits_remaining + credits.free_uses_remaining;
    if (!this.#capabilities?.purchases) {
      this.#setState("disabled", credits.has_credit
        ? `You have ${plural(total, "use", "uses")} left.`
        : "You have no uses left. This agent does not sell credits.");
    } else if (!credits.has_credit) {
      const options = credits.purchase_options;
      const why = credits.reason ? `${credits.reason}.` : "You have no uses left.";
      this.#setState("no-credit", options
        ? `${why} Buy ${plural(options.uses, "use", "uses")} for ${formatMoney(options.price_minor, options.currency)} to continue.`
        : `${why} Buy credits to continue.`);
    } else {
      this.#setState("ready", `You have ${plural(total, "use", "uses")} left.`);
    }
    this.#renderBalance();
  }

  #renderBalance() {
    const credits = this.#credits;
    const number = this.#q(".number");
    const unit = this.#q(".unit");
    const breakdown = this.#q(".breakdown");
    if (!credits) {
      number.textContent = "–";
      unit.textContent = "";
      breakdown.replaceChildren();
    } else {
      const total = credits.credits_remaining + credits.free_uses_remaining;
      number.textContent = String(total);
      unit.textContent = total === 1 ? "use" : "uses";
      const daily = credits.daily_free_uses_included;
      const free = typeof daily === "number" && daily > 0 ? `free (${daily} of them daily)` : "free";
      // Where nothing can be bought, a "0 paid" line would only raise a question.
      const pools = [[credits.free_uses_remaining, free]];
      if (this.#capabilities?.purchases || credits.credits_remaining > 0) pools.push([credits.credits_remaining, "paid"]);
      breakdown.replaceChildren(...pools.map(([value, label]) => {
        const item = document.createElement("li");
        const count = document.createElement("b");
        count.textContent = String(value);
        item.append(count, ` ${label}`);
        return item;
      }));
    }
    this.#renderLowBalance();
    const buy = this.#q(".buy");
    const options = this.#chosenPack() ?? credits?.purchase_options;
    buy.textContent = options
      ? `Buy ${plural(options.uses, "use", "uses")} for ${formatMoney(options.price_minor, options.currency)}`
      : "Buy credits";
    this.#showBuying(this.state);
  }

  /** The packs the agent sells, when it sells several (`capabilities.packs`): the user chooses. */
  #packs() {
    const packs = this.#capabilities?.packs;
    return Array.isArray(packs) && packs.length > 1 ? packs : [];
  }

  /** The pack chosen in the list (the first, the default, until the user picks another); null with one. */
  #chosenPack() {
    const packs = this.#packs();
    if (!packs.length) return null;
    const select = this.#q(".packs");
    if (select.options.length !== packs.length) {
      select.replaceChildren(...packs.map((pack) => {
        const option = document.createElement("option");
        option.value = pack.id;
        option.textContent = `${plural(pack.uses, "use", "uses")} for ${formatMoney(pack.price_minor, pack.currency)}`;
        return option;
      }));
    }
    return packs.find((pack) => pack.id === select.value) ?? packs[0];
  }

  #showBuying(state) {
    const hidden = !["ready", "no-credit"].includes(state) || !this.#capabilities?.purchases;
    this.#q(".buy").hidden = hidden;
    this.#q(".packs").hidden = hidden || !this.#packs().length;
  }

  /** At or under the agent's `low_balance_threshold` (and not yet out: the status says that), a notice. */
  #renderLowBalance() {
    const notice = this.#q(".low-balance");
    const credits = this.#credits;
    const threshold = this.#capabilities?.low_balance_threshold;
    const total = credits ? credits.credits_remaining + credits.free_uses_remaining : 0;
    const low = typeof threshold === "number" && total > 0 && total <= threshold;
    notice.hidden = !low;
    if (!low) return notice.replaceChildren();
    const heading = document.createElement("strong");
    heading.textContent = "Running low:";
    const more = this.#capabilities?.purchases ? " Buy more to keep going." : "";
    notice.replaceChildren(heading, ` ${plural(total, "use", "uses")} left.${more}`);
  }

  async #refreshQuietly() {
    if (!this.#client) return;
    const run = this.#run;
    try {
      const product = this.getAttribute("product");
      const credits = product ? (await this.#productView(product))[1] : await this.#client.getCredits();
      if (run !== this.#run) return;
      this.#credits = credits;
      if (["ready", "no-credit", "disabled"].includes(this.state)) this.#backToBalance();
      else this.#renderBalance();
      if (this.#capabilities?.transactions) await this.#loadHistory(this.#historyOffset);
    } catch (error) {
      if (run === this.#run && !this.#unauthorized(error) && !["paying", "processing"].includes(this.state)) this.#failLoading(error, run);
    }
  }

  /**
   * The `product` attribute (tool credits): that product's uses, free and paid, shown as the balance
   * in place of the interaction credits; nothing is bought or listed there (tool packs are bought
   * in the apps' stores).
   */
  async #productView(product) {
    const balance = await this.#client.getToolBalance(product);
    const credits = {
      has_credit: balance.total_available > 0,
      credits_remaining: balance.paid_credits,
      free_uses_remaining: balance.free_remaining,
      total_uses: balance.total_uses,
      plan_name: balance.product_type,
      purchase_required: false,
      purchase_options: null,
    };
    return [{ provider: "unknown", purchases: false, transactions: false, product: balance.product_type }, credits];
  }

  async #loadHistory(offset) {
    // What a spend was for, as the ledger keeps it (docs/credits.md): its model, tokens and tool.
    const usageOf = (usage) => {
      if (!usage || typeof usage !== "object") return [];
      const tokens = [usage.input_tokens, usage.output_tokens].filter((n) => typeof n === "number");
      return [
        typeof usage.model === "string" ? usage.model : "",
        tokens.length ? `${tokens.join(" → ")} tokens` : "",
        typeof usage.tool === "string" ? usage.tool : "",
      ].filter(Boolean);
    };
    const run = this.#run;
    let page;
    try {
      page = await this.#client.getTransactions({ limit: HISTORY_PAGE, offset });
    } catch (error) {
      if (run === this.#run && !this.#unauthorized(error)) this.#q(".history").hidden = true;
      return;
    }
    if (run !== this.#run) return;
    this.#historyOffset = offset;
    const balance = BALANCE_LABELS.get(this.#capabilities?.provider) ?? BALANCE_LABEL;
    this.#q("th.balance").textContent = balance;
    const rows = page.transactions.map((txn) => {
      const row = document.createElement("tr");
      const when = new Date(txn.created_at);
      const amount = txn.type === "charge" ? -Math.abs(txn.amount_minor) : Math.abs(txn.amount_minor);
      const cells = [
        ["when", Number.isNaN(when.getTime()) ? txn.created_at : when.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" })],
        ["what", [txn.description, ...usageOf(txn.metadata)].join(" · ")],
        [`amount ${txn.type}`, amount > 0 ? `+${amount}` : `−${Math.abs(amount)}`],
        ["balance", txn.balance_after ?? ""],
      ];
      // Shown beside the numbers where the header row is hidden (narrow layout).
      const labels = { amount: Math.abs(amount) === 1 ? " use" : " uses", balance: `${balance}: ` };
      for (const [name, text] of cells) {
        const cell = document.createElement("td");
        cell.className = name;
        cell.textContent = String(text);
        const label = labels[name.split(" ")[0]];
        if (label) cell.dataset.label = label;
        row.append(cell);
      }
      row.dataset.type = txn.type;
      return row;
    });
    this.#q("tbody").replaceChildren(...rows);
    this.#q("table").hidden = rows.length === 0;
    this.#q(".empty").hidden = rows.length > 0;
    const pager = this.#q(".pager");
    pager.hidden = page.total_count <= HISTORY_PAGE && offset === 0;
    this.#q(".range").textContent = rows.length ? `${offset + 1}–${offset + rows.length} of ${page.total_count}` : "";
    this.#q(".newer").disabled = offset === 0;
    this.#q(".older").disabled = !page.has_more;
    this.#q(".history").hidden = false;
  }

  // -- buying ----------------------------------------------------------------------------------------

  async #buy() {
    const run = this.#run;
    const buy = this.#q(".buy");
    buy.disabled = true;
    this.#setState(this.state, "Preparing the payment form…", { busy: true });
    try {
      const returnUrl = this.getAttribute("return-url") || undefined;
      const purchase = await this.#client.initiatePurchase({ returnUrl, pack: this.#chosenPack()?.id });
      const Stripe = await loadStripe(this.#stripeJs());
      if (run !== this.#run) return;
      this.#purchase = purchase;
      this.#stripe = Stripe(purchase.publishable_key);
      this.#mountCard();
      const price = formatMoney(purchase.amount_minor, purchase.currency);
      this.#q(".summary").textContent = `${plural(purchase.uses_purchased, "use", "uses")} for ${price}. Enter your card details.`;
      this.#q(".pay").textContent = `Pay ${price}`;
      this.#q(".pay").disabled = false;
      this.#q(".card-error").textContent = "";
      this.#setState("paying", CARD_NEEDED);
      this.#card.focus?.();
    } catch (error) {
      if (run !== this.#run || this.#unauthorized(error)) return;
      if (error instanceof BillingNotEnabled) {
        this.#capabilities = { ...this.#capabilities, purchases: false };
        this.#backToBalance();
        return;
      }
      const message = isTransient(error)
        ? "Payments are temporarily unavailable. Please try again in a moment."
        : `The purchase could not be started: ${detailText(error)}`;
      this.#setState("error", message);
      this.#offer("Try again", () => this.#buy(), { dismiss: true });
    } finally {
      buy.disabled = false;
    }
  }

  /** The `stripe-js` attribute, else the stand-in the agent names (only `serve --fake-backend` does), else Stripe's. */
  #stripeJs() {
    const named = this.#capabilities?.stripe_js;
    // A path on the agent only: a reply never sends the page to another site's script.
    const own = typeof named === "string" && /^\/[^/\\]/.test(named) ? new URL(named, `${this.#client.apiBase}/`).href : null;
    return this.getAttribute("stripe-js") || own || DEFAULT_STRIPE_JS;
  }

  #mountCard() {
    this.#destroyCard();
    this.#cardHost = document.createElement("div");
    this.#cardHost.slot = "card-element";
    // The card inputs are slotted from outside the shadow form, so Enter in them would submit nothing.
    this.#cardHost.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !this.#q(".pay").disabled) { event.preventDefault(); this.#pay(); }
    });
    this.append(this.#cardHost);
    const computed = getComputedStyle(this);
    this.#card = this.#stripe.elements().create("card", {
      style: { base: { fontFamily: computed.fontFamily, fontSize: "16px", color: computed.color } },
    });
    this.#card.on?.("change", (event) => {
      this.#q(".card-error").textContent = event.error?.message || "";
      // The status says what is next, not what was true before the card was filled in.
      if (this.state === "paying" && !this.#q(".pay").disabled) {
        this.#setState("paying", event.complete ? `Card details complete: press ${this.#q(".pay").textContent} to finish.` : CARD_NEEDED);
      }
    });
    this.#card.mount(this.#cardHost);
  }

  #destroyCard() {
    try { this.#card?.destroy?.(); } catch { /* already gone with its iframe */ }
    this.#card = null;
    this.#cardHost?.remove();
    this.#cardHost = null;
  }

  #cancelPayment() {
    this.#backToBalance();
    this.#q(".buy").focus();
  }

  async #pay() {
    const run = this.#run;
    const purchase = this.#purchase;
    if (!purchase || !this.#card) return;
    const pay = this.#q(".pay");
    pay.disabled = true;
    this.#q(".cancel").disabled = true;
    this.#setState("paying", "Confirming your payment…", { busy: true });
    let result;
    try {
      result = await this.#stripe.confirmCardPayment(purchase.client_secret, { payment_method: { card: this.#card } });
    } catch (error) {
      result = { error: { message: error?.message || "The payment could not be sent." } };
    } finally {
      this.#q(".cancel").disabled = false;
    }
    if (run !== this.#run) return;
    if (result.error) {
      pay.disabled = false;
      if (result.error.type === "validation_error") {
        this.#q(".card-error").textContent = result.error.message;
        this.#setState("paying", "Check your card details.");
        return;
      }
      this.#failed(purchase, null, `${result.error.message || "Your payment was not accepted."} You have not been charged.`, result.error.code);
      return;
    }
    await this.#settle(purchase, run);
  }

  async #settle(purchase, run) {
    this.#destroyCard();
    this.#offer(null);
    this.#setState("processing", "Payment received. Adding your credits…");
    try {
      const status = await this.#client.waitForPurchase(purchase.payment_id, {
        signal: this.#abort.signal,
        onPoll: (_attempt, reply) => {
          if (run === this.#run && !reply) this.#setState("processing", "Payment received. Still waiting for the billing service…");
        },
      });
      if (run !== this.#run) return;
      try {
        this.#credits = await this.#client.getCredits();
      } catch { /* the balance is refreshed again on the next load */ }
      this.#renderBalance();
      this.#setState("succeeded", `Payment complete: ${plural(status.credits_added ?? purchase.uses_purchased, "use", "uses")} added.`);
      this.#offer("Done", () => { this.#backToBalance(); this.#q(".buy").focus(); });
      if (this.#capabilities?.transactions) this.#loadHistory(0);
      this.dispatchEvent(new CustomEvent("ciris-billing:purchase-succeeded", { bubbles: true, composed: true, detail: status }));
    } catch (error) {
      if (run !== this.#run || this.#unauthorized(error)) return;
      if (error instanceof PurchaseFailed) {
        this.#failed(purchase, error.purchase, error.purchase.status === "canceled" ? "The payment was canceled." : "The payment failed.");
      } else if (error instanceof PurchaseTimeout) {
        this.#setState("error", "Your payment is taking longer than usual to confirm. If you were charged, your credits will appear shortly.");
        this.#offer("Check again", () => this.#settle(purchase, this.#run), { dismiss: true });
      } else {
        this.#setState("error", `Could not check the payment: ${detailText(error)}`);
        this.#offer("Check again", () => this.#settle(purchase, this.#run), { dismiss: true });
      }
    }
  }

  #failed(purchase, status, message, code = null) {
    this.#destroyCard();
    this.#setState("failed", message);
    this.#offer("Try again", () => this.#buy(), { dismiss: true });
    this.dispatchEvent(new CustomEvent("ciris-billing:purchase-failed", {
      bubbles: true, composed: true, detail: { payment_id: purchase.payment_id, status, message, code },
    }));
  }

  // -- rendering -------------------------------------------------------------------------------------

  #setState(state, message, { busy = false } = {}) {
    this.#hadFocus = this.#focusIsHere();
    this.setAttribute("state", state);
    const status = this.#q(".status");
    status.classList.toggle("busy", busy);
    const text = this.#q(".message");
    if (text.textContent !== message) text.textContent = message;
    this.#q(".payment").hidden = state !== "paying";
    this.#showBuying(state);
  }

  /** The one follow-up action shown under the status (none with `label` null). */
  #offer(label, action, { dismiss = false } = {}) {
    this.#followup = label ? action : null;
    this.#q(".followup").hidden = !label;
    this.#q(".again").textContent = label || "";
    this.#q(".dismiss").hidden = !dismiss;
    // Keyboard users keep their place: focus follows when it was here, or was lost with a hidden
    // button of ours. It never moves in from elsewhere, nor from nowhere (e.g. on a load error).
    if (label && this.#focusIsHere()) this.#q(".again").focus();
  }

  #focusIsHere() {
    return this.matches(":focus-within") || (this.#hadFocus && document.activeElement === document.body);
  }
}

if (!customElements.get("ciris-billing")) customElements.define("ciris-billing", CirisBillingElement);
