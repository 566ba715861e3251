#!/usr/bin/env python3
"""Posts one customer invoice to Tryton over raw JSON-RPC, the way erp-poster has to.

    rpc_example.py [--trace] [--reference KEY]

Standard library only, no proteus: every request is the JSON a Rust client would send, and
--trace prints each request body and response. Reads TRIBUTARY_TRYTON_URL, _DB, _USER and
_PASSWORD (defaults: the local stack of deploy/local/up.sh). Exits 0 when the invoice is
posted and found again by its reference; running it twice with the same --reference finds the
first invoice instead of creating a second one (the idempotency erp-poster relies on).

The sequence (see README.md beside this file for the bodies and answers):
  1. common.db.login                        -> user id + session token
  2. model.res.user.get_preferences         -> the context every later call carries
  3. search_read: company, currency, journal, payment term, product (looked up by name/code)
  4. model.party.party.search / create      -> the customer "ACME Corp" (created once)
  5. model.party.party.read                 -> its invoice address and receivable account
     (model.account.configuration.read      -> the default receivable account)
  6. model.account.invoice.search           -> by reference: already posted? then stop
  7. model.account.invoice.create           -> draft invoice with one line
  8. model.account.invoice.post             -> posted, numbered, with its accounting move
  9. model.account.invoice.read             -> state, number, total_amount, reference
 10. common.db.logout
"""

import argparse
import base64
import datetime as dt
import json
import os
import sys
import urllib.error
import urllib.request
from decimal import Decimal


# --- JSON: Tryton's encoding of Decimal, date and datetime -----------------------------------

def encode(obj):
    """json.dumps default=: the objects Tryton expects as {"__class__": ...}."""
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
    """json.loads object_hook=: turns Tryton's {"__class__": ...} objects back into Python."""
    kind = dct.get("__class__")
    if kind == "Decimal":
        return Decimal(dct["decimal"])
    if kind == "date":
        return dt.date(dct["year"], dct["month"], dct["day"])
    if kind == "datetime":
        return dt.datetime(dct["year"], dct["month"], dct["day"], dct["hour"], dct["minute"],
                           dct["second"], dct["microsecond"])
    return dct


# --- The client -----------------------------------------------------------------------------

class RpcError(Exception):
    """Tryton answered with {"error": [...]}: error[0] is the exception class name
    (UserError, UserWarning, AccessError, ...), error[1] its arguments."""

    def __init__(self, method, error):
        super().__init__(f"{method}: {error}")
        self.error = error


class Client:
    def __init__(self, url, database, trace=False):
        self.rpc_url = url.rstrip("/") + f"/{database}/rpc/"
        self.trace = trace
        self.auth = None
        self.context = {}
        self.next_id = 0

    def _post(self, method, params):
        self.next_id += 1
        body = json.dumps({"id": self.next_id, "method": method, "params": params},
                          default=encode)
        headers = {"Content-Type": "application/json"}
        if self.auth:
            headers["Authorization"] = self.auth
        if self.trace:
            print(f"--> POST {self.rpc_url}" + ("  (Authorization: Session ...)" if self.auth else ""))
            print(f"    {body}")
        request = urllib.request.Request(self.rpc_url, data=body.encode(), headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            # Not JSON-RPC errors but HTTP ones: 401 (no/expired session, or a "fresh session"
            # method called on a session idle for more than [session] timeout), 403 (method not
            # exposed over RPC), 429 (too many failed logins).
            if self.trace:
                print(f"<-- HTTP {e.code} {e.read()[:200]!r}")
            raise
        answer = json.loads(raw, object_hook=decode)
        if self.trace:
            print(f"<-- {raw.decode()[:600]}")
        if "error" in answer:
            raise RpcError(method, answer["error"])
        return answer["result"]

    def login(self, user, password):
        user_id, session, _bus_url = self._post("common.db.login",
                                                [user, {"password": password}, "en"])
        token = base64.b64encode(f"{user}:{user_id}:{session}".encode()).decode()
        self.auth = f"Session {token}"
        return user_id

    def logout(self):
        self._post("common.db.logout", [])
        self.auth = None

    def call(self, model_method, *args):
        """model.<model>.<method> with positional args; the context always goes last."""
        return self._post(f"model.{model_method}", [*args, self.context])


# --- The sequence ----------------------------------------------------------------------------

def one(client, model, domain, fields):
    """The single record of model matching domain, as a dict of fields (with "id")."""
    found = client.call(f"{model}.search_read", domain, 0, 2, None, fields)
    if len(found) != 1:
        raise SystemExit(f"expected one {model} matching {domain}, found {len(found)}; "
                         "did deploy/local/tryton/setup.py run?")
    return found[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trace", action="store_true", help="print every request and response")
    parser.add_argument("--reference",
                        default=f"rpc-example-{dt.datetime.now():%Y%m%dT%H%M%S%f}",
                        help="the invoice's external idempotency key")
    args = parser.parse_args()

    client = Client(os.environ.get("TRIBUTARY_TRYTON_URL", "http://127.0.0.1:18000/"),
                    os.environ.get("TRIBUTARY_TRYTON_DB", "tributary"), trace=args.trace)
    user_id = client.login(os.environ.get("TRIBUTARY_TRYTON_USER", "admin"),
                           os.environ.get("TRIBUTARY_TRYTON_PASSWORD", "tributary-local-dev"))
    print(f"logged in as user {user_id}")

    # The user's preferences are the context Tryton's own client sends with every call:
    # company, language, ... Without "company", defaults such as the invoice's company and
    # currency are empty and create fails.
    client.context = client.call("res.user.get_preferences", True)
    print(f"context: company={client.context.get('company')}")

    company = one(client, "company.company", [["party.name", "=", "Tributary Demo Co"]],
                  ["id", "rec_name", "currency"])
    currency = one(client, "currency.currency", [["code", "=", "USD"]], ["id", "code"])
    journal = one(client, "account.journal", [["type", "=", "revenue"]], ["id", "code"])
    term = one(client, "account.invoice.payment_term", [["name", "=", "Net 30"]], ["id"])
    product = one(client, "product.product", [["code", "=", "USAGE-OVERAGE"]],
                  ["id", "rec_name", "default_uom", "account_category",
                   "account_category.account_revenue"])
    # Defaults from the accounting configuration (a singleton, id 1): the receivable account
    # of parties that have none of their own. ("account_receivable_used", what Tryton's UI
    # shows, is a Python property, not a field: reading it over RPC fails with a KeyError.)
    config, = client.call("account.configuration.read", [1], ["default_account_receivable"])
    print(f"company={company['id']} currency={currency['id']} journal={journal['id']} "
          f"payment_term={term['id']} product={product['id']} "
          f"revenue={product['account_category.']['account_revenue']} "
          f"default_receivable={config['default_account_receivable']}")

    # The customer: found by name, created the first time.
    parties = client.call("party.party.search", [["name", "=", "ACME Corp"]], 0, 1, None)
    if parties:
        party_id = parties[0]
    else:
        party_id, = client.call("party.party.create", [{
            "name": "ACME Corp",
            # An invoice needs an invoice address; Tryton adds an empty one to new parties,
            # this one is explicit.
            "addresses": [["create", [{"street": "1 Example Street", "city": "Springfield",
                                       "postal_code": "12345"}]]],
        }])
    party, = client.call("party.party.read", [party_id],
                         ["id", "name", "addresses", "account_receivable",
                          "customer_payment_term"])
    receivable = party["account_receivable"] or config["default_account_receivable"]
    print(f"party={party_id} address={party['addresses'][0]} receivable={receivable}")

    # Idempotency: an invoice carrying this reference already? Then it is not created again.
    found = client.call("account.invoice.search", [["reference", "=", args.reference]],
                        0, None, None)
    if found:
        invoice_id = found[0]
        print(f"invoice with reference {args.reference!r} exists: {invoice_id}")
    else:
        invoice_id, = client.call("account.invoice.create", [{
            "type": "out",
            "company": company["id"],
            "party": party_id,
            "invoice_address": party["addresses"][0],
            "currency": currency["id"],
            "journal": journal["id"],
            "account": receivable,
            "payment_term": term["id"],
            "invoice_date": dt.date.today(),
            "reference": args.reference,
            "description": "Usage overage, example period",
            "lines": [["create", [{
                "type": "line",
                "product": product["id"],
                "unit": product["default_uom"],
                "account": product["account_category."]["account_revenue"],
                "description": "Usage overage: 1234 API calls",
                "quantity": 1234.0,
                "unit_price": Decimal("0.0125"),
            }]]],
        }])
        print(f"created invoice {invoice_id}")

    invoice, = client.call("account.invoice.read", [invoice_id], ["state"])
    if invoice["state"] in ("draft", "validated"):
        # A button: [ids] then the context. Answers null.
        client.call("account.invoice.post", [invoice_id])

    invoice, = client.call("account.invoice.read", [invoice_id],
                           ["state", "number", "total_amount", "untaxed_amount",
                            "reference", "invoice_date", "amount_to_pay", "move"])
    print(f"invoice {invoice_id}: state={invoice['state']} number={invoice['number']} "
          f"total={invoice['total_amount']} reference={invoice['reference']} "
          f"date={invoice['invoice_date']}")

    again = client.call("account.invoice.search", [["reference", "=", args.reference]],
                        0, None, None)
    client.logout()

    ok = invoice["state"] == "posted" and again == [invoice_id] and invoice["number"]
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
