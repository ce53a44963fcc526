// TypeScript declarations for billing.js, the ciris-billing-proxy billing UI kit.

export declare const DEFAULT_PREFIX: "/v1/api/billing";
export declare const DEFAULT_TOOLS_PREFIX: "/v1/api/tools";
export declare const DEFAULT_STRIPE_JS: string;
export type BillingState =
  | "loading" | "ready" | "no-credit" | "disabled" | "paying" | "processing" | "succeeded" | "failed" | "error";
export declare const STATES: readonly BillingState[];

export interface PurchaseOptions { price_minor: number; uses: number; currency: string; }
export interface CreditStatus {
  has_credit: boolean;
  credits_remaining: number;
  free_uses_remaining: number;
  total_uses: number;
  plan_name: string | null;
  purchase_required: boolean;
  purchase_options: PurchaseOptions | null;
  reason?: string | null;
  /** Sent by CIRIS agents beside (not inside) `free_uses_remaining`; never by this package. */
  daily_free_uses_remaining?: number | null;
  daily_free_uses_limit?: number | null;
  /** How many of `free_uses_remaining` are daily free uses. */
  daily_free_uses_included?: number | null;
}
export interface Capabilities {
  provider: string;
  purchases: boolean;
  transactions: boolean;
  /** Whether the agent redeems Google Play purchases (`POST {prefix}/google-play/verify`). */
  google_play: boolean;
  /** Whether the agent redeems App Store purchases (`POST {prefix}/apple-storekit/verify`). */
  apple_storekit: boolean;
  /** False when the agent's gate only checks credit and something else charges (ID-token mode). */
  charges: boolean;
  /** Only from `serve --fake-backend`: the path of its stand-in Stripe.js, which the element loads. */
  stripe_js?: string;
  /** Products sold per use (tool credits); absent from agents that sell none. */
  products?: string[];
  /** At or under this many uses left the element shows a low-balance notice; absent when unset. */
  low_balance_threshold?: number;
  /** The packs `purchase/initiate` sells by id, the default first (the `stripe` provider); the element
   * offers a choice when there are several. Absent or empty: one unnamed pack. */
  packs?: CreditPack[];
}
/** A pack a provider sells: `uses` for `price_minor` (cents) of `currency`. */
export interface CreditPack {
  id: string;
  uses: number;
  price_minor: number;
  currency: string;
}
/** Tool credits: `GET {toolsPrefix}/balance/{tool}` and each item of `GET {toolsPrefix}/balance`. */
export interface ToolBalance {
  product_type: string;
  free_remaining: number;
  paid_credits: number;
  total_available: number;
  price_minor: number;
  total_uses: number;
}
export interface ToolBalances { balances: ToolBalance[]; }
export interface ToolCheck {
  has_credit: boolean;
  product_type: string;
  free_remaining: number;
  paid_credits: number;
  total_available: number;
}
export interface ToolInfo {
  name: string;
  description: string;
  cost: number;
  available: boolean;
  platform_requirements: string[];
}
export interface AvailableTools { tools: ToolInfo[]; platform: string; has_google_auth: boolean; }
export interface ToolPurchase {
  success: boolean;
  product_type: string;
  credits_added: number;
  new_balance: number;
  message: string;
}
export interface PurchaseInitiated {
  payment_id: string;
  client_secret: string;
  amount_minor: number;
  currency: string;
  uses_purchased: number;
  publishable_key?: string | null;
}
export type PaymentState =
  | "succeeded" | "processing" | "pending" | "requires_payment_method" | "requires_confirmation"
  | "requires_action" | "requires_capture" | "failed" | "canceled" | "unknown";
export interface PurchaseStatus { status: PaymentState | string; credits_added: number | null; balance_after: number | null; }
export interface Transaction {
  transaction_id: string;
  type: "charge" | "credit" | string;
  /** In uses (credits), not money, whatever `currency` says: negative for a charge. */
  amount_minor: number;
  currency: string;
  description: string;
  created_at: string;
  /** After this entry: the paid credits left where the agent sells credits, else the uses left. */
  balance_after?: number | null;
  /** Passed on when the provider has them (CIRIS's backend does; the ledger says the line's kind,
   * `spend`, `grant`, ..., and a spend's usage in `metadata`: `model`, `input_tokens`,
   * `output_tokens`, `tool`, `metadata`). */
  transaction_type?: string | null;
  external_transaction_id?: string | null;
  metadata?: Record<string, unknown> | null;
}
export interface TransactionPage { transactions: Transaction[]; total_count: number; has_more: boolean; }

export type TokenSource = string | null | (() => string | null | Promise<string | null>);

export interface BillingClientOptions {
  /** The agent's base URL; default: this page's origin. */
  apiBase?: string;
  /** Where the billing routes live; default /v1/api/billing. */
  prefix?: string;
  /** A bearer token, or a (possibly async) function asked before each call. */
  token?: TokenSource;
  fetch?: typeof fetch;
  /** Where the tool routes live; default /v1/api/tools. */
  toolsPrefix?: string;
}

export interface WaitOptions {
  intervalMs?: number;
  maxIntervalMs?: number;
  timeoutMs?: number;
  onPoll?: (attempt: number, status: PurchaseStatus | null) => void;
  signal?: AbortSignal;
}

export declare class BillingClient {
  constructor(options?: BillingClientOptions);
  apiBase: string;
  prefix: string;
  token: TokenSource;
  getCredits(): Promise<CreditStatus>;
  getCapabilities(): Promise<Capabilities>;
  initiatePurchase(options?: { returnUrl?: string; idempotencyKey?: string; pack?: string }): Promise<PurchaseInitiated>;
  getPurchaseStatus(paymentId: string): Promise<PurchaseStatus>;
  waitForPurchase(paymentId: string, options?: WaitOptions): Promise<PurchaseStatus>;
  getTransactions(options?: { limit?: number; offset?: number }): Promise<TransactionPage>;
  toolsPrefix: string;
  getToolBalance(tool: string): Promise<ToolBalance>;
  getToolBalances(): Promise<ToolBalances>;
  checkTool(tool: string): Promise<ToolCheck>;
  getAvailableTools(): Promise<AvailableTools>;
  /** A repeated purchase is a `BillingAPIError` with status 409. */
  purchaseTool(purchase: { productId: string; purchaseToken: string; toolName: string }): Promise<ToolPurchase>;
  request(
    method: string,
    path: string,
    options?: { body?: unknown; headers?: Record<string, string>; prefix?: string },
  ): Promise<Record<string, unknown>>;
}

export declare class BillingClientError extends Error {}
export declare class BillingConnectionError extends BillingClientError {}
/** The agent answers, but its CORS settings (`cors_origins`) leave this page's origin out. Not transient. */
export declare class OriginNotAllowedError extends BillingClientError {
  constructor(origin: string);
  origin: string;
}
export declare class InvalidReplyError extends BillingClientError {}
export declare class BillingAPIError extends BillingClientError {
  constructor(status: number, detail: unknown);
  status: number;
  detail: unknown;
}
/** 400, 413, 422 */
export declare class InvalidRequestError extends BillingAPIError {}
/** 401 */
export declare class AuthenticationError extends BillingAPIError {}
/** 402 */
export declare class InsufficientCreditError extends BillingAPIError {}
/** 403 "Billing not enabled for this agent" */
export declare class BillingNotEnabled extends BillingAPIError {}
/** any other 403 */
export declare class ForbiddenError extends BillingAPIError {}
/** 404 */
export declare class NotFoundError extends BillingAPIError {}
/** 429 */
export declare class RateLimitedError extends BillingAPIError {}
/** 5xx */
export declare class ServiceUnavailableError extends BillingAPIError {}
export declare class PurchaseFailed extends BillingClientError {
  purchase: PurchaseStatus;
}
export declare class PurchaseTimeout extends BillingClientError {
  last: PurchaseStatus | null;
  error: BillingClientError | null;
}
export declare function errorFor(status: number, detail: unknown): BillingAPIError;
export declare function isTransient(error: unknown): boolean;
export declare function formatMoney(minor: number, currency: string): string;
/** Load Stripe.js (or a stand-in with the same calls) once; resolves with `window.Stripe`. */
export declare function loadStripe(url?: string): Promise<(publishableKey: string) => unknown>;

export interface PurchaseFailedDetail {
  payment_id: string;
  status: PurchaseStatus | null;
  message: string;
  code: string | null;
}

/**
 * `<ciris-billing>`; attributes: `api-base`, `prefix`, `tools-prefix`, and `product` (a product sold
 * per use, e.g. `web_search`: the element then shows that product's uses instead of the credits).
 */
export declare class CirisBillingElement extends HTMLElement {
  /** The bearer token; setting it (re)loads the element. */
  token: string | null;
  /** Asked for a token before each call; wins over `token`. */
  tokenProvider: (() => string | null | Promise<string | null>) | null;
  readonly state: BillingState | null;
  readonly client: BillingClient | null;
  readonly credits: CreditStatus | null;
  readonly capabilities: Capabilities | null;
  /** Read the balance and history again (e.g. after the host app spent a use). */
  refresh(): Promise<void>;
}

declare global {
  interface HTMLElementTagNameMap {
    "ciris-billing": CirisBillingElement;
  }
  interface HTMLElementEventMap {
    "ciris-billing:purchase-succeeded": CustomEvent<PurchaseStatus>;
    "ciris-billing:purchase-failed": CustomEvent<PurchaseFailedDetail>;
    "ciris-billing:unauthorized": CustomEvent<{ status: 401; detail: unknown }>;
  }
}
