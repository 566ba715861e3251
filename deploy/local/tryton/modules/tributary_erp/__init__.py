"""Tributary's additions to Tryton's invoicing, for erp-poster.

- account.invoice: the (company, type, reference) triple is unique, so a second invoice with
  an idempotency key already used fails with a UserError instead of creating a duplicate
  (see invoice.py).

Registered with the Pool through the [register] section of tryton.cfg (the way of Tryton 7
and later; a register() function here would be deprecated). Activated with
`trytond-admin -c CONF -d DB -u tributary_erp`.
"""
