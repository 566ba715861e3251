from trytond.model import Unique
from trytond.pool import PoolMeta


class Invoice(metaclass=PoolMeta):
    __name__ = 'account.invoice'

    @classmethod
    def __setup__(cls):
        super().__setup__()
        t = cls.__table__()
        # erp-poster stores its idempotency key in `reference`. An SQL UNIQUE constraint: on
        # PostgreSQL "ALTER TABLE ... ADD CONSTRAINT account_invoice_reference_unique
        # UNIQUE (company, type, reference)", on SQLite a UNIQUE INDEX of that name. Either
        # way the database itself refuses the second row, also when two transactions race,
        # and Tryton turns the IntegrityError into a UserError with the message below.
        # NULL never equals NULL in SQL, so any number of invoices may have no reference.
        cls._sql_constraints += [
            ('reference_unique', Unique(t, t.company, t.type, t.reference),
                'tributary_erp.msg_invoice_reference_unique'),
            ]

    # An empty reference means "none": stored as NULL, so that it does not count as a value
    # that may occur only once (Tryton's clients send "" for a cleared text field).
    @classmethod
    def create(cls, vlist):
        vlist = [cls._tributary_reference_null(v) for v in vlist]
        return super().create(vlist)

    @classmethod
    def write(cls, *args):
        actions = iter(args)
        args = []
        for records, values in zip(actions, actions):
            args.extend((records, cls._tributary_reference_null(values)))
        super().write(*args)

    @staticmethod
    def _tributary_reference_null(values):
        if 'reference' in values and not (values['reference'] or '').strip():
            values = values.copy()
            values['reference'] = None
        return values
