#!/usr/bin/env python3
"""Read Tributary's records back with Confluent's own Python client and compare them.

Usage: read_confluent.py [-v] EXPECTATIONS.json

EXPECTATIONS.json:
    {"bootstrap": "127.0.0.1:19092",
     "registry": "http://127.0.0.1:18081/apis/ccompat/v7",
     "records": [{"topic": "usage.recorded", "partition": 0, "offset": 12,
                  "expected": {...}}]}

For each record: a confluent_kafka.Consumer (random group.id, no auto commit,
isolation.level=read_committed) is assigned to exactly (topic, partition, offset) and polled
until that offset arrives (30 s per record). The value must be Confluent-framed (magic byte 0,
4-byte big-endian schema id, Avro binary); the schema id must be one of the versions registered
under `<topic>-value` (TopicNameStrategy); the value is decoded by
confluent_kafka.schema_registry.avro.AvroDeserializer, projected to JSON (rules below) and
compared with `expected` (deep equality). A null value (tombstone) projects to null.

Projection (Python object from fastavro -> JSON):
    dict -> object, list -> array, None -> null; bool, int, float, str unchanged
    decimal.Decimal   -> string, format(d.normalize(), 'f'), never an exponent, "-0" -> "0"
                         (Decimal('1E+6') -> "1000000", Decimal('12.500000') -> "12.5")
    datetime.datetime -> (timestamp-millis, tz-aware) "YYYY-MM-DDTHH:MM:SS.mmmZ" in UTC
    datetime.date     -> "YYYY-MM-DD"
    bytes             -> standard base64 (with padding)
    enums are str, unions are the plain branch value (return_record_name is never set)
    Anything else (uuid.UUID, datetime.time, naive datetimes, sub-millisecond datetimes,
    tuples, non-string map keys) is reported as an error instead of being guessed at.

Output: one line per record, `OK topic[partition]@offset`, `MISMATCH topic[partition]@offset`
followed by indented `$.path: expected X got Y` lines, or `FAIL topic[partition]@offset: reason`
(timeout, framing, registry, decode or projection error). -v also prints the projected value of
every mismatching record. Exit 0 only if every record matched and at least one was checked,
1 otherwise, 2 on usage errors (bad arguments, unreadable or malformed expectations file,
client library not installed).
"""

import base64
import datetime
import decimal
import json
import re
import sys
import time
import uuid

RECORD_TIMEOUT_S = 30.0
MAX_DIFF_LINES = 40
MAX_VALUE_CHARS = 200


def usage(message):
    print(f"read_confluent.py: {message}", file=sys.stderr)
    print("usage: read_confluent.py [-v] EXPECTATIONS.json", file=sys.stderr)
    sys.exit(2)


# --- projection ------------------------------------------------------------------------------


class ProjectionError(Exception):
    pass


def decimal_to_json(d):
    if not d.is_finite():
        raise ProjectionError(f"non-finite decimal {d}")
    # normalize() rounds to the context precision: give it enough digits for any Avro decimal.
    with decimal.localcontext() as ctx:
        ctx.prec = max(28, len(d.as_tuple().digits) + 2)
        text = format(d.normalize(), "f")
    if text.startswith("-") and decimal.Decimal(text) == 0:
        text = text[1:]
    return text


def datetime_to_json(dt, path):
    if dt.tzinfo is None or dt.utcoffset() is None:
        raise ProjectionError(f"{path}: naive datetime {dt!r} (local-timestamp-*? not a projection rule)")
    if dt.microsecond % 1000:
        raise ProjectionError(f"{path}: sub-millisecond datetime {dt!r} (timestamp-micros? not a projection rule)")
    utc = dt.astimezone(datetime.timezone.utc)
    return (
        f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d}T"
        f"{utc.hour:02d}:{utc.minute:02d}:{utc.second:02d}.{utc.microsecond // 1000:03d}Z"
    )


def project(value, path="$"):
    """The JSON value for a decoded Avro value, by the rules in the module doc."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value
    if isinstance(value, decimal.Decimal):
        return decimal_to_json(value)
    if isinstance(value, datetime.datetime):  # before date: datetime is a date subclass
        return datetime_to_json(value, path)
    if isinstance(value, datetime.date):
        return f"{value.year:04d}-{value.month:02d}-{value.day:02d}"
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ProjectionError(f"{path}: non-string key {key!r}")
            out[key] = project(item, child_path(path, key))
        return out
    if isinstance(value, list):
        return [project(item, f"{path}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, tuple):
        raise ProjectionError(f"{path}: tuple {value!r} (union with return_record_name?)")
    if isinstance(value, uuid.UUID):
        raise ProjectionError(f"{path}: uuid.UUID {value} (uuid logical type is not a projection rule)")
    raise ProjectionError(f"{path}: unsupported type {type(value).__name__}: {value!r}")


# --- comparison ------------------------------------------------------------------------------

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def child_path(path, key):
    return f"{path}.{key}" if _IDENT.match(key) else f"{path}[{json.dumps(key)}]"


def show(value):
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)
    if len(text) > MAX_VALUE_CHARS:
        text = text[: MAX_VALUE_CHARS - 3] + "..."
    return text


def json_kind(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def diff(expected, got, path="$"):
    """Path-level differences between two JSON values, as 'path: ...' strings."""
    kind = json_kind(expected)
    if kind != json_kind(got):
        return [f"{path}: expected {show(expected)} got {show(got)}"]
    if kind == "object":
        out = []
        for key in sorted(set(expected) | set(got)):
            sub = child_path(path, key)
            if key not in got:
                out.append(f"{sub}: missing (expected {show(expected[key])})")
            elif key not in expected:
                out.append(f"{sub}: unexpected (got {show(got[key])})")
            else:
                out.extend(diff(expected[key], got[key], sub))
        return out
    if kind == "array":
        out = []
        for i, (e, g) in enumerate(zip(expected, got)):
            out.extend(diff(e, g, f"{path}[{i}]"))
        for i in range(len(got), len(expected)):
            out.append(f"{path}[{i}]: missing (expected {show(expected[i])})")
        for i in range(len(expected), len(got)):
            out.append(f"{path}[{i}]: unexpected (got {show(got[i])})")
        return out
    if expected != got:  # numbers compare by value (JSON has no int/float split)
        return [f"{path}: expected {show(expected)} got {show(got)}"]
    return []


# --- expectations file ---------------------------------------------------------------------


def load_expectations(file_name):
    try:
        with open(file_name, encoding="utf-8") as f:
            doc = json.load(f)
    except OSError as e:
        usage(f"cannot read {file_name}: {e}")
    except ValueError as e:
        usage(f"{file_name} is not JSON: {e}")
    if not isinstance(doc, dict):
        usage(f"{file_name}: top level must be an object")
    for key in ("bootstrap", "registry"):
        if not isinstance(doc.get(key), str) or not doc[key]:
            usage(f"{file_name}: '{key}' must be a non-empty string")
    records = doc.get("records")
    if not isinstance(records, list):
        usage(f"{file_name}: 'records' must be an array")
    for i, rec in enumerate(records):
        where = f"{file_name}: records[{i}]"
        if not isinstance(rec, dict):
            usage(f"{where} must be an object")
        if not isinstance(rec.get("topic"), str) or not rec["topic"]:
            usage(f"{where}.topic must be a non-empty string")
        for key in ("partition", "offset"):
            if not isinstance(rec.get(key), int) or isinstance(rec[key], bool) or rec[key] < 0:
                usage(f"{where}.{key} must be a non-negative integer")
        if "expected" not in rec:
            usage(f"{where} has no 'expected'")
    return doc


# --- reading ---------------------------------------------------------------------------------


class RecordFailure(Exception):
    pass


def fetch(consumer, topic, partition, offset):
    """The message at exactly (topic, partition, offset), read_committed; RecordFailure if none."""
    from confluent_kafka import KafkaError, TopicPartition

    consumer.assign([TopicPartition(topic, partition, offset)])
    deadline = time.monotonic() + RECORD_TIMEOUT_S
    last_error = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        msg = consumer.poll(min(1.0, remaining))
        if msg is None:
            continue
        err = msg.error()
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                last_error = f"at end of partition (next offset {msg.offset()})"
            elif err.code() == KafkaError._AUTO_OFFSET_RESET:
                # Offset out of range (not written yet, or deleted): say so, try again shortly.
                last_error = f"offset out of range: {err.str()}"
                time.sleep(0.5)
                consumer.assign([TopicPartition(topic, partition, offset)])
            else:
                last_error = err.str()
                if err.fatal():
                    raise RecordFailure(f"fatal consumer error: {err.str()}")
            continue
        if msg.topic() != topic or msg.partition() != partition:
            continue  # left over from an earlier assignment
        if msg.offset() == offset:
            return msg
        if msg.offset() > offset:
            raise RecordFailure(
                f"offset {offset} was skipped, first record delivered is @{msg.offset()} "
                "(aborted transaction, transaction marker, or compacted away?)"
            )
        # msg.offset() < offset cannot happen after assign at offset; ignore it anyway.
    detail = f"; last: {last_error}" if last_error else ""
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=5)
        detail += f"; watermarks low={low} high={high}"
    except Exception as e:  # noqa: BLE001 - diagnostics only
        detail += f"; watermarks unavailable ({e})"
    raise RecordFailure(f"timeout after {RECORD_TIMEOUT_S:.0f} s waiting for the record{detail}")


class SubjectIds:
    """Schema ids registered under a subject, cached (one registry walk per subject)."""

    def __init__(self, client):
        self.client = client
        self.cache = {}

    def ids(self, subject):
        if subject not in self.cache:
            versions = self.client.get_versions(subject)
            self.cache[subject] = {v: self.client.get_version(subject, v).schema_id for v in versions}
        return self.cache[subject]


def check_record(consumer, deserializer, subject_ids, rec):
    """[] if the record matches, else the lines to print after the MISMATCH header."""
    from confluent_kafka.serialization import MessageField, SerializationContext

    topic, partition, offset = rec["topic"], rec["partition"], rec["offset"]
    msg = fetch(consumer, topic, partition, offset)
    data = msg.value()
    if data is not None:
        if len(data) < 6 or data[0] != 0:
            raise RecordFailure(
                f"not Confluent-framed: {len(data)} bytes starting {data[:8].hex()} "
                "(want magic byte 00, 4-byte schema id, Avro binary)"
            )
        schema_id = int.from_bytes(data[1:5], "big")
        subject = f"{topic}-value"
        try:
            registered = subject_ids.ids(subject)
        except Exception as e:  # noqa: BLE001 - any registry error fails this record
            raise RecordFailure(f"registry: cannot list versions of subject {subject}: {e}") from e
        if schema_id not in registered.values():
            raise RecordFailure(
                f"schema id {schema_id} is not a version of subject {subject} "
                f"(version -> id: {registered})"
            )
    try:
        value = deserializer(data, SerializationContext(topic, MessageField.VALUE))
    except Exception as e:  # noqa: BLE001 - any decode error fails this record
        raise RecordFailure(f"AvroDeserializer: {type(e).__name__}: {e}") from e
    try:
        got = project(value)
    except ProjectionError as e:
        raise RecordFailure(f"projection: {e}") from e
    return got, diff(rec["expected"], got)


def main(argv):
    args = argv[1:]
    verbose = False
    if args and args[0] in ("-v", "--verbose"):
        verbose = True
        args = args[1:]
    if len(args) != 1 or args[0].startswith("-"):
        usage("expected one argument, the expectations file")
    doc = load_expectations(args[0])

    try:
        from confluent_kafka import Consumer
        from confluent_kafka.schema_registry import SchemaRegistryClient
        from confluent_kafka.schema_registry.avro import AvroDeserializer
    except ImportError as e:
        print(f"read_confluent.py: {e}; run tests/python/setup.sh and use the python it prints", file=sys.stderr)
        return 2

    client = SchemaRegistryClient({"url": doc["registry"], "timeout": 20})  # a hung HTTP call fails instead of stalling the run
    deserializer = AvroDeserializer(client)
    subject_ids = SubjectIds(client)
    consumer = Consumer(
        {
            "bootstrap.servers": doc["bootstrap"],
            "group.id": f"tributary-read-confluent-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "auto.offset.reset": "error",
            "enable.partition.eof": True,
        }
    )
    ok = failed = 0
    try:
        for rec in doc["records"]:
            name = f"{rec['topic']}[{rec['partition']}]@{rec['offset']}"
            try:
                got, differences = check_record(consumer, deserializer, subject_ids, rec)
            except RecordFailure as e:
                print(f"FAIL {name}: {e}", flush=True)
                failed += 1
                continue
            if not differences:
                print(f"OK {name}", flush=True)
                ok += 1
                continue
            failed += 1
            print(f"MISMATCH {name} ({len(differences)} difference{'s' if len(differences) != 1 else ''})")
            for line in differences[:MAX_DIFF_LINES]:
                print(f"  {line}")
            if len(differences) > MAX_DIFF_LINES:
                print(f"  ... {len(differences) - MAX_DIFF_LINES} more")
            if verbose:
                print(f"  got: {json.dumps(got, separators=(',', ':'), ensure_ascii=False, sort_keys=True)}")
            sys.stdout.flush()
    finally:
        consumer.close()
    print(f"read_confluent: {ok + failed} records checked, {ok} ok, {failed} failed")
    if ok + failed == 0:
        print("read_confluent: no records in the expectations file: nothing proven", file=sys.stderr)
        return 1
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
