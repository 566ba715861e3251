#!/usr/bin/env python3
"""Creates, idempotently, the accounting set-up that erp-poster posts invoices against.

    setup.py CONFIG_FILE DATABASE

Runs inside the Tryton virtualenv with proteus talking straight to the database (no server;
up.sh runs it before starting trytond, so nothing else holds the SQLite file). Every record is
looked up by a name or code first and created only if missing, so running it again is a no-op
and clients can find each record by the same name instead of hard-coding ids:

  currency.currency               code "USD"
  company.company                 party name "Tributary Demo Co", currency USD
  account.account (chart)         from template account.account_template_root_en ("Universal
                                  Chart of Accounts"); default receivable (1.2.1), payable
                                  (2.1.1), revenue (4.1.2 Services) and expense set in
                                  account.configuration
  account.fiscalyear              names "<this year>" and "<next year>", Jan 1 - Dec 31,
                                  monthly periods, with move and invoice sequences
  product.category                name "Services" (accounting category, revenue account)
  product.product                 codes "USAGE-OVERAGE" ("Usage overage") and "SUBSCRIPTION"
                                  ("Subscription"), service products
  account.invoice.payment_term    name "Net 30" (also the default customer payment term)
  account.invoice.payment.method  name "Tributary": journal "Cash" (code CASH, type cash),
                                  debit and credit account "1.1.1 Cash and Cash Equivalents";
                                  what erp-poster pays invoices with (account.invoice.pay)
  res.user admin                  company set to Tributary Demo Co

Prints one line per record: "exists" or "created", with its id.
"""

import datetime as dt
import os
import sys
from decimal import Decimal

COMPANY_NAME = "Tributary Demo Co"
CURRENCY_CODE = "USD"
CHART_TEMPLATE = "account.account_template_root_en"  # the English one of the charts shipped
CATEGORY_NAME = "Services"
PAYMENT_TERM_NAME = "Net 30"
PAYMENT_METHOD_NAME = "Tributary"
# The account module's own cash journal, and the chart's cash account: a customer payment
# debits it and credits the invoice's receivable account.
PAYMENT_JOURNAL_CODE = "CASH"
PAYMENT_ACCOUNT_CODE = "1.1.1"  # "Cash and Cash Equivalents"
PRODUCTS = [
    # (code, name, list price): prices are only defaults; erp-poster sends its own.
    ("USAGE-OVERAGE", "Usage overage", Decimal("0.01")),
    ("SUBSCRIPTION", "Subscription", Decimal("49.00")),
]


def report(kind, name, record, created):
    print(f"{'created' if created else 'exists '} {kind:<30} {name!r:<28} id={record.id}")


def main(config_file, database):
    # proteus turns a bare database name into TRYTOND_DATABASE_URI; with the SQLite URI set
    # first it only adds the name to it, and the file is found under [database] path.
    os.environ.setdefault("TRYTOND_DATABASE_URI", "sqlite://")
    from proteus import Model, Wizard, config as proteus_config

    cfg = proteus_config.set_trytond(database=database, config_file=config_file)

    currency = ensure_currency(Model)
    company = ensure_company(Model, currency)
    # From here on every call runs in the company's context, like a logged-in user's would.
    User = Model.get("res.user")
    cfg._context = User.get_preferences(True, {})

    accounts = ensure_chart(Model, Wizard, cfg, company)
    for year in (dt.date.today().year, dt.date.today().year + 1):
        ensure_fiscalyear(Model, company, year)
    category = ensure_category(Model, accounts)
    for code, name, price in PRODUCTS:
        ensure_product(Model, category, code, name, price)
    payment_term = ensure_payment_term(Model)
    ensure_configuration(Model, payment_term)
    ensure_payment_method(Model, company)
    return 0


def ensure_currency(Model):
    # The currency module ships no currencies (Tryton loads them with a separate importer that
    # needs the network), so USD is created here.
    Currency = Model.get("currency.currency")
    found = Currency.find([("code", "=", CURRENCY_CODE)])
    if found:
        report("currency.currency", CURRENCY_CODE, found[0], False)
        return found[0]
    usd = Currency(name="U.S. Dollar", code=CURRENCY_CODE, numeric_code="840", symbol="$",
                   rounding=Decimal("0.01"), digits=2)
    usd.save()
    report("currency.currency", CURRENCY_CODE, usd, True)
    return usd


def ensure_company(Model, currency):
    Company = Model.get("company.company")
    Party = Model.get("party.party")
    User = Model.get("res.user")
    found = Company.find([("party.name", "=", COMPANY_NAME)])
    if found:
        company, created = found[0], False
    else:
        party = Party(name=COMPANY_NAME)
        party.save()
        company = Company(party=party, currency=currency)
        company.save()
        created = True
    report("company.company", COMPANY_NAME, company, created)
    # Give the company to every user without one (the admin), as Tryton's own company
    # set-up wizard does, and make it their current company.
    for user in User.find([]):
        if company not in user.companies:
            user.companies.append(company)
        if user.company != company:
            user.company = company
        user.save()
    return company


# Preferred accounts of the chart by code: "4.1.2 Services" is the revenue account a usage
# charge belongs to (the first revenue account of the chart is "4.1.1 Goods").
PREFERRED_CODES = {"revenue": "4.1.2"}


def find_accounts(Model, company):
    Account = Model.get("account.account")
    accounts = {}
    for kind in ("receivable", "payable", "revenue", "expense"):
        domain = [
            (f"type.{kind}", "=", True),
            ("company", "=", company.id),
            ("closed", "!=", True),
        ]
        found = []
        if kind in PREFERRED_CODES:
            found = Account.find(domain + [("code", "=", PREFERRED_CODES[kind])], limit=1)
        found = found or Account.find(domain, limit=1)
        if found:
            accounts[kind] = found[0]
    return accounts


def ensure_chart(Model, Wizard, cfg, company):
    Account = Model.get("account.account")
    AccountTemplate = Model.get("account.account.template")
    ModelData = Model.get("ir.model.data")
    roots = Account.find([("parent", "=", None), ("company", "=", company.id)])
    if roots:
        report("account.account (chart root)", roots[0].name, roots[0], False)
        return find_accounts(Model, company)
    template = AccountTemplate(ModelData.get_id(CHART_TEMPLATE, cfg.context))
    wizard = Wizard("account.create_chart")
    wizard.execute("account")
    wizard.form.account_template = template
    wizard.form.company = company
    wizard.execute("create_account")
    accounts = find_accounts(Model, company)
    # The wizard's last step writes these into account.configuration: the defaults used for
    # new parties (receivable/payable) and for product categories (revenue/expense).
    wizard.form.account_receivable = accounts["receivable"]
    wizard.form.account_payable = accounts["payable"]
    wizard.form.category_account_revenue = accounts["revenue"]
    wizard.form.category_account_expense = accounts["expense"]
    wizard.execute("create_properties")
    root, = Account.find([("parent", "=", None), ("company", "=", company.id)])
    report("account.account (chart root)", root.name, root, True)
    return accounts


def ensure_fiscalyear(Model, company, year):
    FiscalYear = Model.get("account.fiscalyear")
    SequenceStrict = Model.get("ir.sequence.strict")
    SequenceType = Model.get("ir.sequence.type")
    name = str(year)
    found = FiscalYear.find([("name", "=", name), ("company", "=", company.id)])
    if found:
        report("account.fiscalyear", name, found[0], False)
        return found[0]
    move_type, = SequenceType.find([("name", "=", "Account Move")], limit=1)
    invoice_type, = SequenceType.find([("name", "=", "Invoice")], limit=1)
    move_sequence = SequenceStrict(name=f"Account Move {year}", sequence_type=move_type,
                                   company=company)
    move_sequence.save()
    # One strict sequence for all four invoice kinds: numbers like "1", "2"... with a prefix
    # telling the year, so numbers from different years never collide.
    invoice_sequence = SequenceStrict(name=f"Invoice {year}", sequence_type=invoice_type,
                                      company=company, prefix=f"INV/{year}/")
    invoice_sequence.save()
    fiscalyear = FiscalYear(name=name, company=company,
                            start_date=dt.date(year, 1, 1), end_date=dt.date(year, 12, 31),
                            move_sequence=move_sequence)
    seq, = fiscalyear.invoice_sequences
    seq.out_invoice_sequence = invoice_sequence
    seq.in_invoice_sequence = invoice_sequence
    seq.out_credit_note_sequence = invoice_sequence
    seq.in_credit_note_sequence = invoice_sequence
    fiscalyear.save()
    fiscalyear.click("create_period")  # monthly periods
    report("account.fiscalyear", name, fiscalyear, True)
    return fiscalyear


def ensure_category(Model, accounts):
    Category = Model.get("product.category")
    found = Category.find([("name", "=", CATEGORY_NAME), ("accounting", "=", True)])
    if found:
        report("product.category", CATEGORY_NAME, found[0], False)
        return found[0]
    category = Category(name=CATEGORY_NAME, accounting=True)
    category.account_revenue = accounts["revenue"]
    category.account_expense = accounts["expense"]
    category.save()
    report("product.category", CATEGORY_NAME, category, True)
    return category


def ensure_product(Model, category, code, name, price):
    Product = Model.get("product.product")
    Template = Model.get("product.template")
    Uom = Model.get("product.uom")
    found = Product.find([("code", "=", code)])
    if found:
        report("product.product", name, found[0], False)
        return found[0]
    unit, = Uom.find([("name", "=", "Unit")])
    template = Template(name=name, code=code, type="service", default_uom=unit,
                        list_price=price, account_category=category)
    template.save()
    product, = template.products
    report("product.product", name, product, True)
    return product


def ensure_payment_term(Model):
    PaymentTerm = Model.get("account.invoice.payment_term")
    found = PaymentTerm.find([("name", "=", PAYMENT_TERM_NAME)])
    if found:
        report("account.invoice.payment_term", PAYMENT_TERM_NAME, found[0], False)
        return found[0]
    term = PaymentTerm(name=PAYMENT_TERM_NAME, description="Payment due 30 days after the invoice date")
    line = term.lines.new(type="remainder")
    line.relativedeltas.new(days=30)
    term.save()
    report("account.invoice.payment_term", PAYMENT_TERM_NAME, term, True)
    return term


def ensure_configuration(Model, payment_term):
    # New customers get Net 30 unless told otherwise.
    Configuration = Model.get("account.configuration")
    configuration = Configuration(1)
    if configuration.default_customer_payment_term != payment_term:
        configuration.default_customer_payment_term = payment_term
        configuration.save()


def ensure_payment_method(Model, company):
    # What the invoice pay wizard (account.invoice.pay) books a payment with: the journal of
    # the payment's move, and the account its counterpart line goes to (debit for money
    # received, credit for money paid out). Looked up by name, as clients do.
    Method = Model.get("account.invoice.payment.method")
    found = Method.find([("name", "=", PAYMENT_METHOD_NAME), ("company", "=", company.id)])
    if found:
        report("account.invoice.payment.method", PAYMENT_METHOD_NAME, found[0], False)
        return found[0]
    Journal = Model.get("account.journal")
    Account = Model.get("account.account")
    journal = Journal.find([("code", "=", PAYMENT_JOURNAL_CODE), ("type", "=", "cash")], limit=1)
    if not journal:
        # The account module ships it; created only should a database lack it.
        journal = [Journal(name="Cash", code=PAYMENT_JOURNAL_CODE, type="cash")]
        journal[0].save()
    account, = Account.find([("code", "=", PAYMENT_ACCOUNT_CODE), ("company", "=", company.id),
                             ("type", "!=", None), ("closed", "!=", True)])
    method = Method(name=PAYMENT_METHOD_NAME, company=company, journal=journal[0],
                    debit_account=account, credit_account=account)
    method.save()
    report("account.invoice.payment.method", PAYMENT_METHOD_NAME, method, True)
    return method


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
