#!/usr/bin/env python3
"""A webhook receiver for the e2e tests, verifying with the Standard Webhooks project's own
Python library (`standardwebhooks`), not with anything of Tributary's.

  webhook_receiver.py serve --secret whsec_... --port-file F --log F [--port N]
      Listens on 127.0.0.1 (port N, or a free one written to F once bound). Every POST is
      verified with standardwebhooks.Webhook(secret).verify(body, headers):
        - verified: one JSON line {"kind": "delivery", "id", "timestamp", "signature",
          "content_type", "body", "status"} is appended to the log, and the answer is the
          current mode's status (200 at start);
        - refused by the library: {"kind": "refused", "reason"} is logged, the answer is 400.
      POST /_mode with a status (e.g. "503", "410") as the body sets what later deliveries get
      (unsigned: a test's control, not a delivery). 410 answers "endpoint retired".

  webhook_receiver.py check --secret whsec_... --log F
      Takes the first delivery in the log and asks the library about it and two forgeries:
      prints JSON {"original": "accepted" | error, "tampered_body": ..., "replayed_later": ...},
      where tampered_body changes one byte of the body and replayed_later verifies the captured
      request ten minutes after it was sent (the library's clock moved, its 5-minute tolerance
      passed).
"""
import argparse
import json
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import standardwebhooks.webhooks as library
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

LOCK = threading.Lock()
STATE = {"mode": 200}


def serve(args):
    webhook = Webhook(args.secret)
    log = open(args.log, "a", encoding="utf-8")

    def append(entry):
        with LOCK:
            log.write(json.dumps(entry) + "\n")
            log.flush()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *_):  # quiet: the log file is the record
            pass

        def answer(self, status, text=""):
            body = text.encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length).decode("utf-8")
            if self.path == "/_mode":
                STATE["mode"] = int(body.strip())
                self.answer(204)
                return
            headers = {name: value for name, value in self.headers.items()}
            try:
                webhook.verify(body, headers)
            except WebhookVerificationError as error:
                append({"kind": "refused", "reason": str(error)})
                self.answer(400, f"signature refused: {error}")
                return
            status = STATE["mode"]
            append({
                "kind": "delivery",
                "id": self.headers["webhook-id"],
                "timestamp": self.headers["webhook-timestamp"],
                "signature": self.headers["webhook-signature"],
                "content_type": self.headers.get("Content-Type"),
                "body": body,
                "status": status,
                "received_at": time.time(),
            })
            self.answer(status, "endpoint retired" if status == 410 else "")

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    with open(args.port_file, "w", encoding="utf-8") as f:
        f.write(str(server.server_address[1]))
    server.serve_forever()


class _Later(datetime):
    """The library's clock, ten minutes on."""

    @classmethod
    def now(cls, tz=None):
        return datetime.now(tz) + timedelta(minutes=10)


def check(args):
    webhook = Webhook(args.secret)
    with open(args.log, encoding="utf-8") as f:
        delivery = next(e for e in map(json.loads, f) if e["kind"] == "delivery")
    headers = {
        "webhook-id": delivery["id"],
        "webhook-timestamp": delivery["timestamp"],
        "webhook-signature": delivery["signature"],
    }

    def ask(body):
        try:
            webhook.verify(body, headers)
            return "accepted"
        except WebhookVerificationError as error:
            return str(error)

    body = delivery["body"]
    tampered = body.replace('"subject":"', '"subject":"x', 1)
    assert tampered != body, "the body names a subject"
    result = {"original": ask(body), "tampered_body": ask(tampered)}
    library.datetime = _Later
    try:
        result["replayed_later"] = ask(body)
    finally:
        library.datetime = datetime
    print(json.dumps(result))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    s = commands.add_parser("serve")
    s.add_argument("--secret", required=True)
    s.add_argument("--port-file", required=True)
    s.add_argument("--log", required=True)
    s.add_argument("--port", type=int, default=0)
    c = commands.add_parser("check")
    c.add_argument("--secret", required=True)
    c.add_argument("--log", required=True)
    args = parser.parse_args()
    serve(args) if args.command == "serve" else check(args)


if __name__ == "__main__":
    sys.exit(main())
