#!/usr/bin/env python3
"""Health checks for the local stack, standard library only.

    health.py kafka|registry|tryton

Prints one line describing what answered and exits 0, or prints why not and exits 1.
Endpoints come from the variables env.sh exports (TRIBUTARY_KAFKA_BOOTSTRAP, ...).

Why Python and not the tools that ship with each component: a check runs every half second
while up.sh waits, and a JVM start for Kafka's own admin tools costs 1-2 s of CPU on a 2-core
machine that is busy starting the very servers being checked.
"""

import base64
import json
import os
import socket
import struct
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 3.0


class Unhealthy(Exception):
    pass


# --- Kafka ---------------------------------------------------------------------------------
# Two requests of the Kafka wire protocol: ApiVersions v0 (which every broker answers, before
# any negotiation) to learn the Metadata versions it accepts, then Metadata, which a KRaft
# broker answers with itself listed only once it has registered with the controller and been
# unfenced, i.e. when it can serve clients.

API_METADATA = 3
API_VERSIONS = 18
# Metadata v4..v8 share a non-flexible encoding that this parser reads. Kafka 4 removed v0-v3.
METADATA_MIN, METADATA_MAX = 4, 8


def _kafka_request(sock, api_key, version, correlation_id, body):
    client_id = b"tributary-health"
    header = struct.pack(">hhih", api_key, version, correlation_id, len(client_id)) + client_id
    payload = header + body
    sock.sendall(struct.pack(">i", len(payload)) + payload)
    size = struct.unpack(">i", _recv_exact(sock, 4))[0]
    data = _recv_exact(sock, size)
    (got,) = struct.unpack(">i", data[:4])
    if got != correlation_id:
        raise Unhealthy(f"correlation id {got}, expected {correlation_id}")
    return data[4:]


def _recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise Unhealthy("connection closed by broker")
        buf += chunk
    return buf


def _string(data, pos):
    (n,) = struct.unpack(">h", data[pos:pos + 2])
    pos += 2
    if n < 0:
        return None, pos
    return data[pos:pos + n].decode(), pos + n


def check_kafka():
    host, port = os.environ.get("TRIBUTARY_KAFKA_BOOTSTRAP", "127.0.0.1:19092").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as sock:
        sock.settimeout(TIMEOUT_S)
        resp = _kafka_request(sock, API_VERSIONS, 0, 1, b"")
        error, count = struct.unpack(">hi", resp[:6])
        if error:
            raise Unhealthy(f"ApiVersions error code {error}")
        versions = {}
        for i in range(count):
            key, lo, hi = struct.unpack(">hhh", resp[6 + 6 * i:12 + 6 * i])
            versions[key] = (lo, hi)
        lo, hi = versions.get(API_METADATA, (0, -1))
        version = min(hi, METADATA_MAX)
        if version < max(lo, METADATA_MIN):
            raise Unhealthy(f"broker offers Metadata v{lo}-v{hi}; this check reads v4-v8")
        # topics = [] (none: we only want the brokers), allow_auto_topic_creation = false,
        # and for v8 the two include_*_authorized_operations flags = false.
        body = struct.pack(">ib", 0, 0) + (b"\x00\x00" if version >= 8 else b"")
        resp = _kafka_request(sock, API_METADATA, version, 2, body)
    pos = 4  # throttle_time_ms
    (brokers,) = struct.unpack(">i", resp[pos:pos + 4])
    pos += 4
    listed = []
    for _ in range(brokers):
        (node_id,) = struct.unpack(">i", resp[pos:pos + 4])
        bhost, pos = _string(resp, pos + 4)
        (bport,) = struct.unpack(">i", resp[pos:pos + 4])
        _rack, pos = _string(resp, pos + 4)
        listed.append(f"{node_id}@{bhost}:{bport}")
    cluster_id, pos = _string(resp, pos)
    (controller,) = struct.unpack(">i", resp[pos:pos + 4])
    if not listed:
        raise Unhealthy("broker answers but lists no broker yet (still starting)")
    if controller < 0:
        raise Unhealthy("no active controller yet")
    return f"kafka ok: cluster {cluster_id}, brokers {', '.join(listed)}, controller {controller}"


# --- Apicurio Registry --------------------------------------------------------------------

def check_registry():
    url = os.environ.get("TRIBUTARY_REGISTRY_URL", "http://127.0.0.1:18081/apis/ccompat/v7")
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/subjects", timeout=TIMEOUT_S) as resp:
            subjects = json.load(resp)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise Unhealthy(f"GET {url}/subjects: {e}") from e
    return f"registry ok: {url} ({len(subjects)} subjects)"


# --- Tryton -------------------------------------------------------------------------------

def check_tryton():
    url = os.environ.get("TRIBUTARY_TRYTON_URL", "http://127.0.0.1:18000/")
    db = os.environ.get("TRIBUTARY_TRYTON_DB", "tributary")
    user = os.environ.get("TRIBUTARY_TRYTON_USER", "admin")
    password = os.environ.get("TRIBUTARY_TRYTON_PASSWORD", "tributary-local-dev")
    rpc = url.rstrip("/") + f"/{db}/rpc/"

    def call(method, params, headers=None):
        body = json.dumps({"id": 1, "method": method, "params": params}).encode()
        req = urllib.request.Request(
            rpc, data=body, headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
                answer = json.load(resp)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise Unhealthy(f"{method} at {rpc}: {e}") from e
        if "error" in answer:
            raise Unhealthy(f"{method}: {answer['error']}")
        return answer["result"]

    user_id, session, _bus = call("common.db.login", [user, {"password": password}, "en"])
    token = base64.b64encode(f"{user}:{user_id}:{session}".encode()).decode()
    auth = {"Authorization": f"Session {token}"}
    # Log out again so that a status loop does not pile up sessions in ir.session.
    call("common.db.logout", [], auth)
    return f"tryton ok: {rpc} (login as {user}, user id {user_id})"


CHECKS = {"kafka": check_kafka, "registry": check_registry, "tryton": check_tryton}


def main(argv):
    if len(argv) != 2 or argv[1] not in CHECKS:
        print(f"usage: {argv[0]} {'|'.join(CHECKS)}", file=sys.stderr)
        return 2
    try:
        print(CHECKS[argv[1]]())
        return 0
    except (Unhealthy, OSError, struct.error) as e:
        print(f"{argv[1]} down: {e}")
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
