"""Local receivers for the outbox tests (host/tests/outbox.rs), written from the vendors'
documentation, not from the gateway's code.

- POST /webhook: a Standard Webhooks receiver. The signature is verified with the reference
  `standardwebhooks` library (webhook-id, webhook-timestamp, webhook-signature; its 5-minute
  tolerance is the replay window), and the original IntentGate header
  `X-IntentGate-Signature: sha256=<hex HMAC-SHA256(secret, raw body)>` in constant time.
- POST /services/collector/event: Splunk HTTP Event Collector. `Authorization: Splunk <token>`;
  the body is one or more JSON event objects, one after another; each must carry `event`, may
  carry `time` (epoch seconds), `host`, `source`, `sourcetype`, `index`, `fields`, nothing
  else. Answers `{"text": "Success", "code": 0}`; a missing token 401 (code 2), a wrong token
  403 (code 4), no `event` 400 (code 12), no data 400 (code 5).
- POST /api/v2/logs: Datadog logs intake v2. `DD-API-KEY` required (403), `Content-Type:
  application/json`, a JSON array of log objects (at most 1000, payload at most 5 MB), reserved
  attributes `ddsource`, `ddtags`, `hostname`, `message`, `service` as strings. Answers 202 `{}`.
- POST /ndjson/<name>: any collector taking NDJSON; records the lines.
- POST /control {"down": bool, "status": int, "retry_after": str|null, "delay_ms": int}: makes
  every receiver answer `status` (with `Retry-After`) while down, and wait `delay_ms` first.
- GET /records: everything accepted so far; GET /rejected: what was refused and why.

Usage: outbox_receiver.py <webhook secret> <splunk token> <datadog api key>; prints `PORT <n>`.
"""

import hashlib
import hmac
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook

WEBHOOK_SECRET, SPLUNK_TOKEN, DD_KEY = sys.argv[1], sys.argv[2], sys.argv[3]
LOCK = threading.Lock()
STATE = {"down": False, "status": 503, "retry_after": None, "delay_ms": 0}
RECORDS = {"webhook": [], "splunk": [], "datadog": [], "ndjson": {}}
REJECTED = []
HEC_KEYS = {"event", "time", "host", "source", "sourcetype", "index", "fields"}


def hec_events(text):
    """Splunk HEC: JSON objects one after another (whitespace between them is allowed)."""
    decoder = json.JSONDecoder()
    i, out = 0, []
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i == len(text):
            return out
        obj, i = decoder.raw_decode(text, i)
        out.append(obj)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status, body, headers=()):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def reject(self, status, why, body=None):
        with LOCK:
            REJECTED.append({"path": self.path, "status": status, "why": why})
        self.reply(status, body if body is not None else {"error": why})

    def do_GET(self):
        with LOCK:
            if self.path == "/records":
                return self.reply(200, RECORDS)
            if self.path == "/rejected":
                return self.reply(200, REJECTED)
        self.reply(404, {})

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path == "/control":
            with LOCK:
                STATE.update(json.loads(raw))
            return self.reply(200, STATE)
        with LOCK:
            state = dict(STATE)
        if state["delay_ms"]:
            time.sleep(state["delay_ms"] / 1000)
        if state["down"]:
            headers = [("Retry-After", state["retry_after"])] if state["retry_after"] else []
            return self.reply(state["status"], {"error": "down"}, headers)
        if self.path == "/webhook":
            return self.webhook(raw)
        if self.path == "/services/collector/event":
            return self.splunk(raw)
        if self.path == "/api/v2/logs":
            return self.datadog(raw)
        if self.path.startswith("/ndjson/"):
            name = self.path[len("/ndjson/"):]
            lines = [json.loads(l) for l in raw.decode().splitlines() if l.strip()]
            with LOCK:
                RECORDS["ndjson"].setdefault(name, []).extend(lines)
            return self.reply(200, {})
        self.reply(404, {})

    def webhook(self, raw):
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            payload = Webhook(WEBHOOK_SECRET).verify(raw, headers)
        except Exception as e:  # the library raises WebhookVerificationError
            return self.reject(401, f"standard webhooks: {e}")
        legacy = headers.get("x-intentgate-signature", "")
        expected = "sha256=" + hmac.new(WEBHOOK_SECRET.encode(), raw, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(legacy, expected):
            return self.reject(401, "x-intentgate-signature mismatch")
        with LOCK:
            RECORDS["webhook"].append(
                {"id": headers["webhook-id"], "timestamp": headers["webhook-timestamp"], "body": payload}
            )
        self.reply(200, {})

    def splunk(self, raw):
        auth = self.headers.get("Authorization", "")
        if not auth:
            return self.reject(401, "token required", {"text": "Token is required", "code": 2})
        if auth != f"Splunk {SPLUNK_TOKEN}":
            return self.reject(403, "invalid token", {"text": "Invalid token", "code": 4})
        try:
            events = hec_events(raw.decode())
        except ValueError as e:
            return self.reject(400, f"invalid data: {e}", {"text": "Invalid data format", "code": 6})
        if not events:
            return self.reject(400, "no data", {"text": "No data", "code": 5})
        for ev in events:
            if not isinstance(ev, dict) or "event" not in ev:
                return self.reject(400, "event required", {"text": "Event field is required", "code": 12})
            extra = set(ev) - HEC_KEYS
            if extra:
                return self.reject(400, f"unknown keys {extra}", {"text": "Invalid data format", "code": 6})
            if "time" in ev and not isinstance(ev["time"], (int, float, str)):
                return self.reject(400, "bad time", {"text": "Invalid data format", "code": 6})
        with LOCK:
            RECORDS["splunk"].extend(events)
        self.reply(200, {"text": "Success", "code": 0})

    def datadog(self, raw):
        if self.headers.get("DD-API-KEY") != DD_KEY:
            return self.reject(403, "api key", {"errors": ["Forbidden"]})
        if not (self.headers.get("Content-Type") or "").startswith("application/json"):
            return self.reject(400, "content type")
        if len(raw) > 5 * 1024 * 1024:
            return self.reject(413, "payload too large")
        logs = json.loads(raw)
        if isinstance(logs, dict):
            logs = [logs]
        if not isinstance(logs, list) or len(logs) > 1000:
            return self.reject(400, "expected an array of at most 1000 logs")
        for log in logs:
            if not isinstance(log, dict):
                return self.reject(400, "log is not an object")
            for k in ("ddsource", "ddtags", "hostname", "message", "service"):
                if k in log and not isinstance(log[k], str):
                    return self.reject(400, f"{k} must be a string")
        with LOCK:
            RECORDS["datadog"].extend(logs)
        self.reply(202, {})


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(f"PORT {server.server_address[1]}", flush=True)
server.serve_forever()
