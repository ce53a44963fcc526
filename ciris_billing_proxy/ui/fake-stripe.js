// A stand-in for Stripe.js v3, for `ciris-billing-proxy serve --fake-backend`: the calls <ciris-billing>
// makes (Stripe(key), elements(), create("card"), mount, on("change"), confirmCardPayment), a card
// element whose inputs are named like Stripe's own (cardnumber, exp-date, cvc), and Stripe's test
// cards. confirmCardPayment posts to the demo process (same origin, beside this file), which drives
// the fake billing backend: no network and no Stripe account are needed.
(function () {
  "use strict";
  const confirmUrl = new URL("confirm", document.currentScript.src).href;

  const digits = (value) => value.replace(/\D/g, "");

  function luhn(number) {
    let sum = 0;
    for (let i = 0; i < number.length; i += 1) {
      let d = Number(number[number.length - 1 - i]);
      if (i % 2 === 1) d = d * 2 > 9 ? d * 2 - 9 : d * 2;
      sum += d;
    }
    return sum % 10 === 0;
  }

  const problem = (code, message) => ({ type: "validation_error", code, message });

  function readCard(fields) {
    const number = digits(fields.number.value);
    const exp = digits(fields.exp.value);
    const cvc = digits(fields.cvc.value);
    if (number.length < 16) return { error: problem("incomplete_number", "Your card number is incomplete.") };
    if (!luhn(number)) return { error: problem("invalid_number", "Your card number is invalid.") };
    if (exp.length < 4) return { error: problem("incomplete_expiry", "Your card's expiration date is incomplete.") };
    const month = Number(exp.slice(0, 2));
    const year = 2000 + Number(exp.slice(2, 4));
    if (month < 1 || month > 12) return { error: problem("invalid_expiry_month", "Your card's expiration month is invalid.") };
    const now = new Date();
    if (year < now.getFullYear() || (year === now.getFullYear() && month < now.getMonth() + 1)) {
      return { error: problem("invalid_expiry_year_past", "Your card's expiration year is in the past.") };
    }
    if (cvc.length < 3) return { error: problem("incomplete_cvc", "Your card's security code is incomplete.") };
    return { card: { number, exp_month: month, exp_year: year, cvc } };
  }

  // On a phone the number takes the first line and the date and CVC the second, each wide enough
  // for its placeholder, rather than all three squeezed into one.
  const BOX = "display:flex;flex-wrap:wrap;gap:.35rem 1rem;align-items:center;padding:.55rem .75rem;"
    + "border:1px solid #c3cfd9;border-radius:6px;background:#fff;";
  const INPUT = "border:none;outline:none;font:inherit;font-size:16px;color:inherit;background:transparent;"
    + "min-width:0;padding:.15rem 0;";

  class CardElement {
    constructor(options) {
      this._options = options || {};
      this._handlers = { change: [], ready: [], focus: [], blur: [] };
      this._root = null;
      this._fields = null;
    }

    mount(target) {
      const host = typeof target === "string" ? document.querySelector(target) : target;
      if (!host) throw new Error("Fake Stripe: mount target not found");
      const base = (this._options.style && this._options.style.base) || {};
      const root = document.createElement("div");
      root.className = "fake-stripe-card";
      root.style.cssText = "font-family:" + (base.fontFamily || "system-ui, sans-serif") + ";color:" + (base.color || "#1f2933") + ";";
      const box = document.createElement("div");
      box.style.cssText = BOX;
      const make = (name, placeholder, label, autocomplete, flex) => {
        const input = document.createElement("input");
        input.name = name;
        input.placeholder = placeholder;
        input.setAttribute("aria-label", label);
        input.autocomplete = autocomplete;
        input.inputMode = "numeric";
        input.style.cssText = INPUT + "flex:" + flex + ";";
        input.addEventListener("input", () => this._changed(input));
        input.addEventListener("focus", () => { box.style.borderColor = "#3949ab"; this._emit("focus", {}); });
        input.addEventListener("blur", () => { box.style.borderColor = "#c3cfd9"; this._emit("blur", {}); });
        box.append(input);
        return input;
      };
      this._fields = {
        number: make("cardnumber", "Card number", "Card number", "cc-number", "1 1 14em"),
        exp: make("exp-date", "MM / YY", "Expiration date", "cc-exp", "0 0 5.5em"),
        cvc: make("cvc", "CVC", "CVC", "cc-csc", "0 0 3.5em"),
      };
      const note = document.createElement("p");
      note.style.cssText = "margin:.4rem 0 0;font-size:12px;color:#616e7c;";
      note.textContent = "Test mode (fake Stripe): 4242 4242 4242 4242 succeeds, 4000 0000 0000 0002 is declined, "
        + "4000 0000 0000 9995 has insufficient funds. Any future date, any CVC.";
      root.append(box, note);
      host.append(root);
      this._root = root;
      setTimeout(() => this._emit("ready", {}), 0);
    }

    _changed(input) {
      const fields = this._fields;
      if (input === fields.number) {
        input.value = digits(input.value).slice(0, 16).replace(/(\d{4})(?=\d)/g, "$1 ");
        if (digits(input.value).length === 16) fields.exp.focus();
      } else if (input === fields.exp) {
        const d = digits(input.value).slice(0, 4);
        input.value = d.length > 2 ? d.slice(0, 2) + " / " + d.slice(2) : d;
        if (d.length === 4) fields.cvc.focus();
      } else {
        input.value = digits(input.value).slice(0, 4);
      }
      const read = readCard(fields);
      const empty = !digits(fields.number.value) && !digits(fields.exp.value) && !digits(fields.cvc.value);
      const incomplete = read.error && read.error.code.startsWith("incomplete");
      this._emit("change", {
        elementType: "card",
        empty,
        complete: !read.error,
        brand: digits(fields.number.value).startsWith("4") ? "visa" : "unknown",
        error: read.error && !incomplete ? read.error : undefined,
      });
    }

    _emit(event, payload) {
      for (const handler of this._handlers[event] || []) handler(payload);
    }

    on(event, handler) {
      (this._handlers[event] = this._handlers[event] || []).push(handler);
      return this;
    }

    off(event, handler) {
      this._handlers[event] = (this._handlers[event] || []).filter((h) => h !== handler);
      return this;
    }

    focus() { if (this._fields) this._fields.number.focus(); }
    blur() { if (this._fields) document.activeElement.blur(); }
    clear() { if (this._fields) for (const input of Object.values(this._fields)) input.value = ""; }
    unmount() { if (this._root) this._root.remove(); this._root = null; }
    destroy() { this.unmount(); this._fields = null; }
  }

  function Stripe(publishableKey) {
    if (typeof publishableKey !== "string" || !publishableKey.startsWith("pk_")) {
      throw new Error("Fake Stripe: a publishable key (pk_...) is required");
    }
    return {
      elements() {
        return { create(type, options) {
          if (type !== "card") throw new Error("Fake Stripe supports the card element only");
          return new CardElement(options);
        } };
      },
      async confirmCardPayment(clientSecret, data) {
        const card = data && data.payment_method && data.payment_method.card;
        if (!(card instanceof CardElement) || !card._fields) {
          return { error: problem("missing_card", "The card element is not mounted.") };
        }
        const read = readCard(card._fields);
        if (read.error) return read;
        let response;
        try {
          response = await fetch(confirmUrl, {
            method: "POST",
            headers: { "Content-Type": "application/json" },
            body: JSON.stringify({ client_secret: clientSecret, card: read.card }),
          });
          const body = await response.json();
          if (body.error) return { error: body.error };
          return { paymentIntent: body.payment_intent };
        } catch (exc) {
          return { error: { type: "api_connection_error", message: "Could not reach the payment service." } };
        }
      },
    };
  }

  window.Stripe = Stripe;
})();
