#!/usr/bin/env python3
"""Check Tributary's Avro schema conventions (stdlib only).

Usage: python3 schemas/check_conventions.py [SCHEMA_DIR]

Checks every <topic>.avsc in SCHEMA_DIR (default: the folder of this script) and every
released/<topic>/v<N>.avsc for the machine-checkable conventions of schemas/README.md:

  * the file is JSON; the top level is a record named in PascalCase, namespace io.tributary.<area>,
    and its doc says what the Kafka key is
  * every record, enum and fixed has a non-empty doc, and so has every field
  * the FIRST field of every top-level record is `envelope`, whose type is the record
    io.tributary.Envelope, byte-for-byte identical in every file (and semantically identical to
    the expected field list)
  * no `float` or `double` anywhere
  * every enum has a `default` that is one of its symbols; symbols are UPPER_SNAKE_CASE
  * every union is exactly ["null", T] and such a field has "default": null
  * decimals are bytes with precision 18 and scale 6; long logical types are timestamp-millis only;
    int logical types are date only
  * field names are snake_case, record/enum names PascalCase
  * a named type defined in several files has the same definition everywhere (so generated code
    can share one type)
  * every expected topic has a schema and a released/<topic>/v1.avsc

Exits 1 and prints one line per problem when anything is wrong, else prints a summary and exits 0.
Whether money sits next to an ISO-4217 currency is a review item: it is not checked here.
"""
import json
import os
import re
import sys

TOPICS = [
    "usage.events", "usage.recorded", "usage.thresholds", "usage.late",
    "refdata.customers", "refdata.contracts", "refdata.price-plans",
    "billing.invoices", "billing.payments", "billing.charges",
    "erp.postings", "erp.posting-results",
    "entitlement.changes",
    "support.cases", "support.account-flags",
    "crm.account-updates",
    "renewal.notifications",
    "webhook.deliveries",
    "entitlement.overrides",
]

ENVELOPE_FIELDS = [
    ("event_id", "string"),
    ("occurred_at", {"type": "long", "logicalType": "timestamp-millis"}),
    ("correlation_id", "string"),
    ("causation_id", ["null", "string"]),
    ("source", "string"),
    ("account_id", "string"),
]

PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}
SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
PASCAL = re.compile(r"^[A-Z][A-Za-z0-9]*$")
UPPER = re.compile(r"^[A-Z][A-Z0-9]*(_[A-Z0-9]+)*$")
NAMESPACE = re.compile(r"^io\.tributary\.[a-z][a-z0-9]*$")


class Checker:
    def __init__(self):
        self.errors = []
        self.named = {}  # full name -> (canonical json, file)

    def err(self, where, msg):
        self.errors.append(f"{where}: {msg}")

    # -- walking ---------------------------------------------------------------------------
    def walk(self, schema, path, ns, where, defined):
        """Check a schema node. `defined` holds full names defined so far in this file."""
        if isinstance(schema, str):
            if schema in ("float", "double"):
                self.err(where, f"{path}: {schema} is forbidden (money is decimal, quantities are decimal)")
            elif schema not in PRIMITIVES:
                full = schema if "." in schema else f"{ns}.{schema}"
                if full not in defined and schema not in defined:
                    self.err(where, f"{path}: reference to undefined type {schema}")
            return
        if isinstance(schema, list):
            if len(schema) != 2 or schema[0] != "null" or schema[1] == "null":
                self.err(where, f"{path}: unions must be exactly [\"null\", T] (optional field), got {json.dumps(schema)}")
            for i, branch in enumerate(schema):
                if isinstance(branch, list):
                    self.err(where, f"{path}: nested union")
                else:
                    self.walk(branch, f"{path}|{i}", ns, where, defined)
            return
        if not isinstance(schema, dict):
            self.err(where, f"{path}: unexpected schema node {schema!r}")
            return
        t = schema.get("type")
        if t in ("record", "enum", "fixed"):
            self.named_type(schema, path, ns, where, defined)
        elif t == "array":
            self.walk(schema.get("items"), f"{path}[]", ns, where, defined)
        elif t == "map":
            self.walk(schema.get("values"), f"{path}{{}}", ns, where, defined)
        elif t in PRIMITIVES:
            if t in ("float", "double"):
                self.err(where, f"{path}: {t} is forbidden")
            lt = schema.get("logicalType")
            if lt is not None:
                self.logical(schema, t, lt, path, where)
        else:
            self.walk(t, path, ns, where, defined)

    def logical(self, schema, t, lt, path, where):
        if lt == "decimal":
            if t != "bytes" or schema.get("precision") != 18 or schema.get("scale") != 6:
                self.err(where, f"{path}: decimals must be bytes with precision 18 and scale 6")
        elif lt == "timestamp-millis":
            if t != "long":
                self.err(where, f"{path}: timestamp-millis must be on long")
        elif lt == "date":
            if t != "int":
                self.err(where, f"{path}: date must be on int")
        else:
            self.err(where, f"{path}: logical type {lt} not allowed (use decimal, timestamp-millis or date)")

    def named_type(self, schema, path, ns, where, defined):
        name = schema.get("name", "")
        own_ns = name.rsplit(".", 1)[0] if "." in name else schema.get("namespace", ns)
        short = name.rsplit(".", 1)[-1]
        full = f"{own_ns}.{short}" if own_ns else short
        if not PASCAL.match(short):
            self.err(where, f"{path}: type name {short!r} is not PascalCase")
        if not isinstance(schema.get("doc"), str) or not schema["doc"].strip():
            self.err(where, f"{path}: {schema['type']} {full} has no doc")
        if full in defined:
            self.err(where, f"{path}: {full} is defined twice in this file (reference it by name instead)")
        defined.add(full)
        canonical = json.dumps(dict(schema, namespace=own_ns, name=short), sort_keys=True)
        if full in self.named:
            prev, prev_file = self.named[full]
            if prev != canonical:
                self.err(where, f"{path}: {full} differs from its definition in {prev_file}; "
                                f"a named type must be identical in every file")
        else:
            self.named[full] = (canonical, where)

        if schema["type"] == "enum":
            symbols = schema.get("symbols") or []
            for s in symbols:
                if not UPPER.match(s):
                    self.err(where, f"{path}: enum {full} symbol {s!r} is not UPPER_SNAKE_CASE")
            if "default" not in schema:
                self.err(where, f"{path}: enum {full} has no default (needed so readers survive new symbols)")
            elif schema["default"] not in symbols:
                self.err(where, f"{path}: enum {full} default {schema['default']!r} is not one of its symbols")
            return
        if schema["type"] == "fixed":
            return
        fields = schema.get("fields")
        if not isinstance(fields, list) or not fields:
            self.err(where, f"{path}: record {full} has no fields")
            return
        seen = set()
        for fl in fields:
            fname = fl.get("name", "?")
            fpath = f"{full}.{fname}"
            if fname in seen:
                self.err(where, f"{fpath}: duplicate field")
            seen.add(fname)
            if not SNAKE.match(fname):
                self.err(where, f"{fpath}: field name is not snake_case")
            if not isinstance(fl.get("doc"), str) or not fl["doc"].strip():
                self.err(where, f"{fpath}: field has no doc")
            ftype = fl.get("type")
            if isinstance(ftype, list) and ftype and ftype[0] == "null":
                if "default" not in fl or fl["default"] is not None:
                    self.err(where, f"{fpath}: optional field must have \"default\": null")
            self.walk(ftype, fpath, own_ns, where, defined)

    # -- files -----------------------------------------------------------------------------
    def check_file(self, path, where, envelope_texts):
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
            schema = json.loads(text)
        except (OSError, ValueError) as e:
            self.err(where, f"cannot read JSON: {e}")
            return
        if not isinstance(schema, dict) or schema.get("type") != "record":
            self.err(where, "top level must be a record")
            return
        ns = schema.get("namespace", "")
        if not NAMESPACE.match(ns):
            self.err(where, f"namespace {ns!r} must be io.tributary.<area>")
        if "Kafka key" not in (schema.get("doc") or ""):
            self.err(where, "top-level doc must say what the Kafka key is (\"Kafka key: ...\")")
        fields = schema.get("fields") or []
        if not fields or fields[0].get("name") != "envelope":
            self.err(where, "the first field must be `envelope`")
        else:
            env = fields[0].get("type")
            if not (isinstance(env, dict) and env.get("type") == "record" and env.get("name") == "Envelope"
                    and env.get("namespace") == "io.tributary"):
                self.err(where, "envelope must be the record io.tributary.Envelope, defined inline")
            else:
                got = [(fl.get("name"), fl.get("type")) for fl in env.get("fields", [])]
                if got != ENVELOPE_FIELDS:
                    self.err(where, f"envelope fields differ from the convention: {got}")
                causation = env["fields"][3] if len(env.get("fields", [])) > 3 else {}
                if causation.get("default", "missing") is not None:
                    self.err(where, "envelope.causation_id must default to null")
                raw = self.raw_envelope(text)
                if raw is None:
                    self.err(where, "cannot locate the envelope's JSON text")
                else:
                    envelope_texts.append((where, raw))
        self.walk(schema, schema.get("name", "?"), "", where, set())

    @staticmethod
    def raw_envelope(text):
        """The exact text of the `envelope` field's type object."""
        m = re.search(r'"fields"\s*:\s*\[\s*', text)
        if not m:
            return None
        try:
            field, end = json.JSONDecoder().raw_decode(text, m.end())
        except ValueError:
            return None
        if field.get("name") != "envelope":
            return None
        tm = re.search(r'"type"\s*:\s*', text[m.end():end])
        if not tm:
            return None
        start = m.end() + tm.end()
        try:
            _, tend = json.JSONDecoder().raw_decode(text, start)
        except ValueError:
            return None
        return text[start:tend]


def main():
    root = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__)))
    c = Checker()
    envelope_texts = []
    present = sorted(n[:-len(".avsc")] for n in os.listdir(root) if n.endswith(".avsc"))
    for topic in TOPICS:
        if topic not in present:
            c.err(f"{topic}.avsc", "missing schema for expected topic")
    for topic in present:
        if topic not in TOPICS:
            c.err(f"{topic}.avsc", "schema for a topic unknown to this checker (add it to TOPICS)")
        c.check_file(os.path.join(root, topic + ".avsc"), f"{topic}.avsc", envelope_texts)

    released_root = os.path.join(root, "released")
    released = 0
    for topic in present:
        rdir = os.path.join(released_root, topic)
        versions = sorted(n for n in os.listdir(rdir) if re.match(r"^v[0-9]+\.avsc$", n)) if os.path.isdir(rdir) else []
        if "v1.avsc" not in versions:
            c.err(f"released/{topic}", "missing released/<topic>/v1.avsc")
        for v in versions:
            released += 1
            # Released versions are frozen history: they get the same checks, except that a later
            # convention must not fail an old release retroactively for shared-type identity.
            sub = Checker()
            sub.check_file(os.path.join(rdir, v), f"released/{topic}/{v}", envelope_texts)
            c.errors.extend(sub.errors)

    if envelope_texts:
        ref_where, ref_text = envelope_texts[0]
        for where, text in envelope_texts[1:]:
            if text != ref_text:
                c.err(where, f"envelope JSON is not byte-for-byte identical to the one in {ref_where}")

    if c.errors:
        for e in c.errors:
            print(f"ERROR {e}")
        print(f"{len(c.errors)} convention error(s) in {root}", file=sys.stderr)
        return 1
    print(f"ok: {len(present)} schemas and {released} released versions follow the conventions "
          f"({len(c.named)} named types)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
