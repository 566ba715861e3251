#!/usr/bin/env python3
"""Sends usage to usage-ingest with the CloudEvents Python SDK (`cloudevents` 2.x), the way a
platform would, for the e2e tests: nothing of Tributary's builds the requests.

  cloudevents_client.py PLAN.json

PLAN is {"url": ..., "key": ..., "requests": [REQUEST, ...]}, each REQUEST being
  {"mode": "binary" | "structured" | "batch", "events": [{"attributes": {...}, "data": ...}],
   "headers": {...}, "drop": ["ce-id", ...], "body": "..."}
- binary:     the SDK's to_binary_event (attributes in ce-* headers, the data alone as the body);
- structured: the SDK's to_structured_event (application/cloudevents+json);
- batch:      the events' structured JSON in one array (application/cloudevents-batch+json;
              the SDK writes single events only, so the array is joined here).
`headers` are added to the request (e.g. traceparent, Accept), `drop` removes headers the SDK
wrote (to send an event the SDK would refuse to build, e.g. without ce-id), `body` replaces the
body the SDK wrote (e.g. data that is not JSON). Prints one JSON line per request:
{"status", "content_type", "body"} with the body parsed as JSON where it is.
"""
import http.client
import json
import sys
import urllib.parse

from cloudevents.core.bindings.http import to_binary_event, to_structured_event
from cloudevents.core.v1.event import CloudEvent


def event_of(spec):
    return CloudEvent(spec["attributes"], spec.get("data"))


def message_of(request):
    events = [event_of(spec) for spec in request["events"]]
    mode = request["mode"]
    if mode == "binary":
        message = to_binary_event(events[0])
        headers, body = dict(message.headers), message.body
    elif mode == "structured":
        message = to_structured_event(events[0])
        headers, body = dict(message.headers), message.body
    elif mode == "batch":
        parts = [to_structured_event(event).body for event in events]
        headers = {"content-type": "application/cloudevents-batch+json"}
        body = b"[" + b",".join(parts) + b"]"
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    for name in request.get("drop", []):
        headers = {k: v for k, v in headers.items() if k.lower() != name.lower()}
    if "body" in request:
        body = request["body"].encode()
    headers.update(request.get("headers", {}))
    return headers, body


def send(url, key, headers, body):
    # http.client rather than urllib: urllib adds "Content-Type: application/x-www-form-urlencoded"
    # to a body sent without one, and a binary-mode event without datacontenttype has none.
    target = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
    try:
        connection.request("POST", target.path, body=body, headers={**headers, "Authorization": f"Bearer {key}"})
        response = connection.getresponse()
        return response.status, response.getheader("content-type", ""), response.read()
    finally:
        connection.close()


def main():
    with open(sys.argv[1], encoding="utf-8") as file:
        plan = json.load(file)
    for request in plan["requests"]:
        headers, body = message_of(request)
        status, content_type, answer = send(plan["url"], plan["key"], headers, body)
        try:
            parsed = json.loads(answer) if answer else None
        except ValueError:
            parsed = answer.decode(errors="replace")
        print(json.dumps({"status": status, "content_type": content_type, "body": parsed}), flush=True)


if __name__ == "__main__":
    main()
