#!/usr/bin/env python3
"""Runs, over raw JSON-RPC, every call sequence erp-poster needs, and checks each by reading back.

    rpc_erp_poster.py [--url URL] [--db DB] [--user USER] [--password PW] [--run-id ID] [--trace]

Standard library only (urllib + json): every request is the JSON a Rust client would send.
Defaults come from TRIBUTARY_TRYTON_URL, _DB, _USER, _PASSWORD (the local stack of up.sh).
Needs the database set up by setup.py (company, chart, fiscal years, products, payment method
"Tributary") with the module tributary_erp activated (unique invoice reference).

  a. create + post a customer invoice with a reference; read back number, state, total
  b. a second invoice with the same reference: refused with a UserError (tributary_erp);
     invoices without a reference: allowed any number of times
  c. a credit note for (a): a new "out" invoice with its own reference, negative quantities,
     lines linked by origin to the original lines; create + post; found via origin_invoices;
     then both settled against each other (account.move.reconcile_lines): both "paid"
  d. pay an invoice in full with the account.invoice.pay wizard (payment method "Tributary"),
     once as Tryton's client does (execute "start" for the defaults first) and once with the
     values only; a partial payment (through the wizard's "ask" state) for comparison
  e. find the payment again by its description (the external payment reference)
  f. pay an invoice already paid: refused with a UserError ("You cannot overpay ...")

Every run uses fresh references (from --run-id, default a timestamp), so it can run again on
the same database. Prints each call and its answer (whole bodies with --trace); exits 1 if
any expectation fails.
"""

import argparse
import base64
import datetime as dt
import json
import os
import sys
import urllib.error
import urllib.request
from decimal import ROUND_HALF_EVEN, Decimal


# --- JSON: Tryton's encoding of Decimal and date --------------------------------------------

def encode(obj):
    if isinstance(obj, Decimal):
        return {"__class__": "Decimal", "decimal": str(obj)}
    if isinstance(obj, dt.datetime):
        return {"__class__": "datetime", "year": obj.year, "month": obj.month, "day": obj.day,
                "hour": obj.hour, "minute": obj.minute, "second": obj.second,
                "microsecond": obj.microsecond}
    if isinstance(obj, dt.date):
        return {"__class__": "date", "year": obj.year, "month": obj.month, "day": obj.day}
    raise TypeError(f"cannot encode {type(obj).__name__}")


def decode(dct):
    kind = dct.get("__class__")
    if kind == "Decimal":
        return Decimal(dct["decimal"])
    if kind == "date":
        return dt.date(dct["year"], dct["month"], dct["day"])
    if kind == "datetime":
        return dt.datetime(dct["year"], dct["month"], dct["day"], dct["hour"], dct["minute"],
                           dct["second"], dct["microsecond"])
    return dct


def dumps(obj):
    return json.dumps(obj, default=encode, ensure_ascii=False)


# --- The client -----------------------------------------------------------------------------

class RpcError(Exception):
    """{"error": [class name, args]}: e.g. ["UserError", [message, description, domain]]."""

    def __init__(self, method, error, raw):
        super().__init__(f"{method}: {raw}")
        self.error = error
        self.raw = raw


class Client:
    def __init__(self, url, database, trace=False, width=400):
        self.rpc_url = url.rstrip("/") + f"/{database}/rpc/"
        self.trace = trace
        self.width = width
        self.auth = None
        self.context = {}
        self.next_id = 0

    def _show(self, prefix, text):
        if not self.trace and len(text) > self.width:
            text = text[:self.width] + f"... ({len(text)} chars)"
        print(f"    {prefix} {text}")

    def post(self, method, params):
        """One JSON-RPC call; returns the decoded answer object ({"id", "result"|"error"})."""
        self.next_id += 1
        body = dumps({"id": self.next_id, "method": method, "params": params})
        headers = {"Content-Type": "application/json"}
        if self.auth:
            headers["Authorization"] = self.auth
        self._show("-->", body)
        request = urllib.request.Request(self.rpc_url, data=body.encode(), headers=headers)
        try:
            # No Accept-Encoding sent: the answer is plain JSON even when it is labelled gzip
            # (trytond 8.2 quirk, see README.md), and urllib does not try to decompress it.
            with urllib.request.urlopen(request, timeout=120) as response:
                raw = response.read().decode()
        except urllib.error.HTTPError as e:
            print(f"    <-- HTTP {e.code} {e.read()[:200]!r}")
            raise
        self._show("<--", raw)
        answer = json.loads(raw, object_hook=decode)
        answer["_raw"] = raw
        return answer

    def call_method(self, method, params):
        answer = self.post(method, params)
        if "error" in answer:
            raise RpcError(method, answer["error"], answer["_raw"])
        return answer["result"]

    def login(self, user, password):
        user_id, session, _bus = self.call_method("common.db.login",
                                                  [user, {"password": password}, "en"])
        token = base64.b64encode(f"{user}:{user_id}:{session}".encode()).decode()
        self.auth = f"Session {token}"
        return user_id

    def logout(self):
        self.call_method("common.db.logout", [])
        self.auth = None

    def call(self, model_method, *args, context=None):
        """model.<model>.<method>; the context always goes last."""
        return self.call_method(f"model.{model_method}",
                                [*args, self.context if context is None else context])

    def answer(self, model_method, *args, context=None):
        """Like call, but returns the whole answer object, errors included."""
        return self.post(f"model.{model_method}",
                         [*args, self.context if context is None else context])

    def wizard(self, name, method, *args, context):
        return self.call_method(f"wizard.{name}.{method}", [*args, context])

    def wizard_answer(self, name, method, *args, context):
        return self.post(f"wizard.{name}.{method}", [*args, context])


# --- Checks ---------------------------------------------------------------------------------

FAILURES = []


def step(title):
    print(f"\n=== {title}")


def expect(condition, what):
    print(f"  {'ok  ' if condition else 'FAIL'} {what}")
    if not condition:
        FAILURES.append(what)
    return condition


def cents(amount):
    return amount.quantize(Decimal("0.01"), rounding=ROUND_HALF_EVEN)


def is_user_error(answer, text):
    error = answer.get("error")
    return (isinstance(error, list) and len(error) == 2 and error[0] == "UserError"
            and text in error[1][0])


# --- Reference data -------------------------------------------------------------------------

def one(client, model, domain, fields):
    found = client.call(f"{model}.search_read", domain, 0, 2, None, fields)
    if len(found) != 1:
        raise SystemExit(f"expected one {model} matching {domain}, found {len(found)}; "
                         "did deploy/local/tryton/setup.py run?")
    return found[0]


def reference_data(client):
    step("reference data (looked up by name/code, once)")
    ref = {}
    ref["company"] = one(client, "company.company", [["party.name", "=", "Tributary Demo Co"]],
                         ["id", "currency"])
    ref["currency"] = one(client, "currency.currency", [["code", "=", "USD"]], ["id"])
    ref["journal"] = one(client, "account.journal", [["type", "=", "revenue"]], ["id", "code"])
    ref["term"] = one(client, "account.invoice.payment_term", [["name", "=", "Net 30"]], ["id"])
    ref["products"] = {
        code: one(client, "product.product", [["code", "=", code]],
                  ["id", "default_uom", "account_category.account_revenue"])
        for code in ("USAGE-OVERAGE", "SUBSCRIPTION")}
    config, = client.call("account.configuration.read", [1], ["default_account_receivable"])
    ref["receivable"] = config["default_account_receivable"]
    ref["method"] = one(client, "account.invoice.payment.method",
                        [["name", "=", "Tributary"], ["company", "=", ref["company"]["id"]]],
                        ["id", "name", "journal.code", "debit_account.code",
                         "credit_account.code"])
    parties = client.call("party.party.search", [["name", "=", "ACME Corp"]], 0, 1, None)
    if not parties:
        parties = client.call("party.party.create", [{
            "name": "ACME Corp",
            "addresses": [["create", [{"street": "1 Example Street", "city": "Springfield",
                                       "postal_code": "12345"}]]]}])
    party, = client.call("party.party.read", parties, ["addresses", "account_receivable"])
    ref["party"] = party["id"]
    ref["address"] = party["addresses"][0]
    ref["receivable"] = party["account_receivable"] or ref["receivable"]
    m = ref["method"]
    print(f"  company={ref['company']['id']} currency={ref['currency']['id']} "
          f"journal={ref['journal']['id']} term={ref['term']['id']} party={ref['party']} "
          f"receivable={ref['receivable']} payment method {m['name']!r} id={m['id']} "
          f"journal={m['journal.']['code']} debit={m['debit_account.']['code']} "
          f"credit={m['credit_account.']['code']}")
    return ref


# --- The sequences --------------------------------------------------------------------------

def invoice_values(ref, reference, lines):
    values = {
        "type": "out",
        "company": ref["company"]["id"],
        "party": ref["party"],
        "invoice_address": ref["address"],
        "currency": ref["currency"]["id"],
        "journal": ref["journal"]["id"],
        "account": ref["receivable"],
        "payment_term": ref["term"]["id"],
        "invoice_date": dt.date.today(),
        "description": "Tributary usage",
        "lines": [["create", lines]],
    }
    if reference is not None:
        values["reference"] = reference
    return values


def line_values(ref, code, quantity, unit_price, description, origin=None):
    product = ref["products"][code]
    line = {
        "type": "line",
        "product": product["id"],
        "unit": product["default_uom"],
        "account": product["account_category."]["account_revenue"],
        "description": description,
        "quantity": quantity,
        "unit_price": unit_price,
    }
    if origin is not None:
        line["origin"] = origin
    return line


INVOICE_FIELDS = ["type", "state", "number", "reference", "total_amount", "untaxed_amount",
                  "amount_to_pay", "lines", "invoice_date", "move"]


def create_and_post(client, ref, reference, lines):
    invoice_id, = client.call("account.invoice.create", [invoice_values(ref, reference, lines)])
    client.call("account.invoice.post", [invoice_id])
    invoice, = client.call("account.invoice.read", [invoice_id], INVOICE_FIELDS)
    return invoice


def step_a(client, ref, reference):
    step(f"a. create + post customer invoice, reference {reference!r}")
    expect(client.call("account.invoice.search", [["reference", "=", reference]], 0, None, None)
           == [], "no invoice with this reference yet")
    lines = [
        line_values(ref, "USAGE-OVERAGE", 1234.0, Decimal("0.0125"),
                    "Usage overage: 1234 API calls"),
        line_values(ref, "SUBSCRIPTION", 1.0, Decimal("49.00"), "Subscription, one month"),
    ]
    expected = sum(cents(Decimal(str(l["quantity"])) * l["unit_price"]) for l in lines)
    invoice = create_and_post(client, ref, reference, lines)
    print(f"  invoice id={invoice['id']} number={invoice['number']} state={invoice['state']} "
          f"total={invoice['total_amount']} lines={invoice['lines']}")
    expect(invoice["state"] == "posted", "state is posted")
    expect(bool(invoice["number"]), f"numbered ({invoice['number']})")
    expect(invoice["total_amount"] == expected, f"total_amount {invoice['total_amount']} == "
           f"{expected} (15.425 rounds half-even to 15.42, + 49.00)")
    expect(invoice["reference"] == reference, "reference kept")
    return invoice


def step_b(client, ref, invoice):
    reference = invoice["reference"]
    step(f"b. a second invoice with reference {reference!r}: refused")
    lines = [line_values(ref, "USAGE-OVERAGE", 1.0, Decimal("1.00"), "duplicate attempt")]
    answer = client.answer("account.invoice.create", [invoice_values(ref, reference, lines)])
    print(f"  answer: {answer['_raw']}")
    expect(is_user_error(answer, "already used"), "create answers UserError 'already used'")
    expect(client.call("account.invoice.search", [["reference", "=", reference]], 0, None, None)
           == [invoice["id"]], "still exactly one invoice with this reference")

    step("b. invoices without a reference (NULL, or \"\" stored as NULL): allowed many times")
    drafts = client.call("account.invoice.create", [
        invoice_values(ref, None, lines), invoice_values(ref, None, lines),
        invoice_values(ref, "", lines), invoice_values(ref, "", lines)])
    read = client.call("account.invoice.read", drafts, ["reference", "state"])
    expect(len(drafts) == 4 and all(r["reference"] is None for r in read),
           f"4 drafts created, all with reference null: {drafts}")
    answer = client.answer("account.invoice.write", drafts[:1], {"reference": reference})
    print(f"  write of a used reference: {answer['_raw']}")
    expect(is_user_error(answer, "already used"), "write of a used reference: same UserError")
    client.call("account.invoice.delete", drafts)
    expect(client.call("account.invoice.search", [["id", "in", drafts]], 0, None, None) == [],
           "drafts deleted again")


def step_c(client, ref, invoice, reference):
    step(f"c. credit note for {invoice['number']}, reference {reference!r}")
    original_lines = client.call("account.invoice.line.read", invoice["lines"],
                                 ["product.code", "quantity", "unit_price", "description"])
    lines = [
        line_values(ref, l["product."]["code"], -l["quantity"], l["unit_price"],
                    f"Credit: {l['description']}", origin=f"account.invoice.line,{l['id']}")
        for l in sorted(original_lines, key=lambda l: l["id"])]
    credit = create_and_post(client, ref, reference, lines)
    print(f"  credit note id={credit['id']} number={credit['number']} state={credit['state']} "
          f"total={credit['total_amount']} amount_to_pay={credit['amount_to_pay']}")
    expect(credit["type"] == "out" and credit["state"] == "posted", "type out, state posted")
    expect(credit["total_amount"] == -invoice["total_amount"],
           f"total_amount {credit['total_amount']} == -{invoice['total_amount']}")
    origins, = client.call("account.invoice.read", [credit["id"]], ["origin_invoices"])
    expect(origins["origin_invoices"] == [invoice["id"]],
           f"origin_invoices of the credit note == [{invoice['id']}]")
    found = client.call("account.invoice.search",
                        [["origin_invoices", "=", invoice["id"]]], 0, None, None)
    expect(found == [credit["id"]], f"search origin_invoices = {invoice['id']} -> {found}")
    found = client.call("account.invoice.line.search_read",
                        [["origin", "=", f"account.invoice.line,{invoice['lines'][0]}"]],
                        0, None, None, ["invoice", "quantity"])
    expect([l["invoice"] for l in found] == [credit["id"]],
           f"search line origin = account.invoice.line,{invoice['lines'][0]} -> {found}")
    again, = client.call("account.invoice.read", [invoice["id"]], ["state", "amount_to_pay"])
    expect(again["state"] == "posted" and again["amount_to_pay"] == invoice["total_amount"],
           f"the original is still posted, amount_to_pay {again['amount_to_pay']}: a credit "
           "note made this way is not reconciled with it")

    step("c. settle credit note and invoice against each other: account.move.reconcile_lines")
    # Both receivable lines ("lines_to_pay") reconciled together: they balance, so the wizard
    # goes start -> reconcile -> end without a write-off form, and both invoices become paid.
    both = client.call("account.invoice.read", [invoice["id"], credit["id"]], ["lines_to_pay"])
    lines = sorted(l for i in both for l in i["lines_to_pay"])
    ctx = {**client.context, "active_model": "account.move.line", "active_id": lines[0],
           "active_ids": lines}
    session, _, _ = client.wizard("account.move.reconcile_lines", "create", context=ctx)
    answer = client.wizard_answer("account.move.reconcile_lines", "execute", session, {},
                                  "start", context=ctx)
    expect(answer.get("result") == {}, f"execute start answers {answer['_raw']}")
    client.wizard("account.move.reconcile_lines", "delete", session, context=ctx)
    both = client.call("account.invoice.read", [invoice["id"], credit["id"]],
                       ["state", "amount_to_pay"])
    expect(all(i["state"] == "paid" and i["amount_to_pay"] == 0 for i in both),
           f"invoice and credit note both paid: {dumps(both)}")
    return credit


def form_values(defaults):
    """A view's defaults as values to send back: without the "field." keys (the rec_name of
    a Many2One, for display), which the server refuses ("object has no attribute 'company.'")."""
    return {k: v for k, v in defaults.items() if not k.endswith(".")}


def pay_context(client, invoice_id):
    return {**client.context, "active_model": "account.invoice", "active_id": invoice_id,
            "active_ids": [invoice_id]}


def pay(client, ref, invoice, amount, description, with_start=True):
    """Runs account.invoice.pay up to its first answer after "start"; returns
    (session id, the "choice" answer object, start values sent, context)."""
    ctx = pay_context(client, invoice["id"])
    session, start, end = client.wizard("account.invoice.pay", "create", context=ctx)
    print(f"  wizard session {session}, states {start!r} -> {end!r}")
    values = {}
    if with_start:
        # What Tryton's client does first: run the "start" view for its defaults (a large
        # answer: the whole form definition).
        shown = client.wizard("account.invoice.pay", "execute", session, {}, "start",
                              context=ctx)
        defaults = shown["view"]["defaults"]
        print(f"  start defaults: {dumps(defaults)}")
        values.update(form_values(defaults))
    values.update({
        "amount": amount,
        "currency": ref["currency"]["id"],
        "payment_method": ref["method"]["id"],
        "date": dt.date.today(),
        "description": description,
    })
    answer = client.wizard_answer("account.invoice.pay", "execute", session,
                                  {"start": values}, "choice", context=ctx)
    return session, answer, values, ctx


def step_d(client, ref, reference, run_id):
    lines = [line_values(ref, "SUBSCRIPTION", 1.0, Decimal("49.00"), "Subscription")]
    results = {}
    for with_start in (True, False):
        reference_n = f"{reference}-{'ui' if with_start else 'min'}"
        invoice = create_and_post(client, ref, reference_n, lines)
        description = f"tributary:payment:pi_{run_id}-{'ui' if with_start else 'min'}"
        how = ("as Tryton's client: create, execute start, execute choice, delete"
               if with_start else "values only: create, execute choice, delete")
        step(f"d. pay {invoice['number']} ({invoice['total_amount']}) in full, {how}")
        session, answer, _, ctx = pay(client, ref, invoice, invoice["amount_to_pay"],
                                      description, with_start=with_start)
        print(f"  execute choice answer: {answer['_raw']}")
        expect(answer.get("result") == {}, "full payment: answer {} (choice -> pay -> end, "
               "no ask state)")
        deleted = client.wizard("account.invoice.pay", "delete", session, context=ctx)
        expect(deleted is None, f"wizard delete answers {deleted!r}")
        paid, = client.call("account.invoice.read", [invoice["id"]],
                            ["state", "amount_to_pay", "payment_lines", "reconciled"])
        print(f"  invoice afterwards: {dumps(paid)}")
        expect(paid["state"] == "paid", "state is paid")
        expect(paid["amount_to_pay"] == 0, "amount_to_pay is 0")
        results[with_start] = (invoice, description)

    invoice = create_and_post(client, ref, f"{reference}-partial", lines)
    step(f"d. partial payment of 10.00 on {invoice['number']} ({invoice['total_amount']}): "
         "through the ask state")
    session, answer, _, ctx = pay(client, ref, invoice, Decimal("10.00"),
                                  f"tributary:payment:pi_{run_id}-partial", with_start=False)
    view = (answer.get("result") or {}).get("view") or {}
    print(f"  execute choice answer: state={view.get('state')!r} "
          f"defaults={dumps(view.get('defaults'))}")
    expect(view.get("state") == "ask" and view["defaults"].get("type") == "partial",
           "answer is the ask view, default type partial")
    answer = client.wizard_answer("account.invoice.pay", "execute", session,
                                  {"ask": {"type": "partial"}}, "pay", context=ctx)
    print(f"  execute pay answer: {answer['_raw']}")
    expect(answer.get("result") == {}, "execute pay with ask.type partial answers {}")
    client.wizard("account.invoice.pay", "delete", session, context=ctx)
    after, = client.call("account.invoice.read", [invoice["id"]], ["state", "amount_to_pay"])
    expect(after["state"] == "posted" and after["amount_to_pay"] == Decimal("39.00"),
           f"still posted, amount_to_pay {after['amount_to_pay']} == 39.00")
    return results[False]


def step_e(client, invoice, description):
    step(f"e. find the payment of {invoice['number']} again by its description "
         f"{description!r}")
    moves = client.call("account.move.search_read", [["description", "=", description]],
                        0, None, None, ["number", "state", "origin", "journal.code", "date"])
    print(f"  moves: {dumps(moves)}")
    expect(len(moves) == 1 and moves[0]["origin"] == f"account.invoice,{invoice['id']}"
           and moves[0]["state"] == "posted",
           "one posted account.move with that description, origin the invoice")
    lines = client.call("account.move.line.search_read",
                        [["move.description", "=", description]], 0, None, None,
                        ["account.code", "debit", "credit", "party", "reconciliation"])
    print(f"  its move lines: {dumps(lines)}")
    expect(len(lines) == 2, "two move lines: receivable (credit) and cash (debit)")
    paid, = client.call("account.invoice.read", [invoice["id"]],
                        ["payment_lines", "payment_lines.move.description"])
    print(f"  invoice payment_lines: {dumps(paid)}")
    expect([l["move."]["description"] for l in paid["payment_lines."]] == [description],
           "the invoice's payment_lines carry the description (via move.description)")
    none = client.call("account.move.search", [["description", "=", description + "-nope"]],
                       0, None, None)
    expect(none == [], "an unknown payment reference finds nothing")


def step_f(client, ref, invoice, description):
    step(f"f. pay {invoice['number']} again, already paid")
    session, answer, values, ctx = pay(client, ref, invoice, invoice["total_amount"],
                                       f"{description}-again",
                                       with_start=False)
    view = (answer.get("result") or {}).get("view") or {}
    print(f"  execute choice answer: state={view.get('state')!r} "
          f"defaults={dumps(view.get('defaults'))}")
    expect(view.get("state") == "ask", "answer is the ask view (nothing left to pay)")
    ask = form_values(view.get("defaults") or {})
    answer = client.wizard_answer("account.invoice.pay", "execute", session, {"ask": ask},
                                  "pay", context=ctx)
    print(f"  execute pay answer: {answer['_raw']}")
    expect(is_user_error(answer, "You cannot overpay"), "UserError 'You cannot overpay'")
    client.wizard("account.invoice.pay", "delete", session, context=ctx)
    after, = client.call("account.invoice.read", [invoice["id"]],
                         ["state", "payment_lines"])
    expect(after["state"] == "paid" and len(after["payment_lines"]) == 1,
           "still paid, still one payment line")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default=os.environ.get("TRIBUTARY_TRYTON_URL",
                                                        "http://127.0.0.1:18000/"))
    parser.add_argument("--db", default=os.environ.get("TRIBUTARY_TRYTON_DB", "tributary"))
    parser.add_argument("--user", default=os.environ.get("TRIBUTARY_TRYTON_USER", "admin"))
    parser.add_argument("--password", default=os.environ.get("TRIBUTARY_TRYTON_PASSWORD",
                                                             "tributary-local-dev"))
    parser.add_argument("--run-id", default=f"{dt.datetime.now():%Y%m%dT%H%M%S%f}",
                        help="makes this run's references unique")
    parser.add_argument("--trace", action="store_true", help="print whole request/answer bodies")
    parser.add_argument("--full-context", action="store_true",
                        help="send the whole get_preferences answer as context, as Tryton's "
                        "client does (default: only {\"company\": id}, which is enough)")
    args = parser.parse_args()

    client = Client(args.url, args.db, trace=args.trace)
    step("login")
    user_id = client.login(args.user, args.password)
    preferences = client.call("res.user.get_preferences", True)
    client.context = (preferences if args.full_context
                      else {"company": preferences["company"]})
    print(f"  user {user_id}, context {dumps(client.context)[:120]}")

    ref = reference_data(client)
    invoice = step_a(client, ref, f"tributary:invoice:{args.run_id}")
    step_b(client, ref, invoice)
    step_c(client, ref, invoice, f"tributary:credit-note:{args.run_id}")
    paid, description = step_d(client, ref, f"tributary:invoice:{args.run_id}-paid",
                               args.run_id)
    step_e(client, paid, description)
    step_f(client, ref, paid, description)
    client.logout()

    print()
    if FAILURES:
        print(f"FAILED: {len(FAILURES)} expectation(s):")
        for what in FAILURES:
            print(f"  - {what}")
        return 1
    print("OK: every expectation met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
