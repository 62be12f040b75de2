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
- POST /slack/<name>: a Slack incoming webhook. A JSON object with `text` (the notification
  fallback) and/or `blocks` (Block Kit, at most 50): `header` (a `plain_text` object of at most
  150 characters), `section` (`text` of at most 3000 characters, or `fields`: at most 10 text
  objects of at most 2000 characters each), `context` (1 to 10 text or image elements),
  `divider`. Text objects are `plain_text` or `mrkdwn`. Answers 200 `ok` (text/plain), or 400
  `invalid_payload` / `invalid_blocks` / `no_text` as Slack does.
- POST /teams/<name>: a Microsoft Teams incoming webhook carrying an Adaptive Card: a
  `message` with `attachments` whose `contentType` is `application/vnd.microsoft.card.adaptive`
  and whose `content` is an `AdaptiveCard` (`version` "1.0"-"1.5", `body` of elements:
  `TextBlock` with a string `text`, `FactSet` with `facts` of string `title`/`value`,
  `RichTextBlock` whose `inlines` are `TextRun`s with a string `text` (version 1.2 on),
  `Container`/`ColumnSet`/`Image`). Answers 200 `1`.
- POST /pagerduty/v2/enqueue: PagerDuty Events API v2. `routing_key` (the 32-character
  integration key), `event_action` trigger|acknowledge|resolve, `dedup_key` (at most 255
  characters; required to acknowledge or resolve), and for a trigger a `payload` with
  `summary` (at most 1024 characters), `source`, `severity` critical|error|warning|info,
  optional `timestamp` (ISO 8601), `component`, `group`, `class` (strings) and
  `custom_details` (an object). Answers 202 `{"status": "success", "message": "Event
  processed", "dedup_key": …}`, or 400 `{"status": "invalid event", "errors": [...]}`.
- POST /control {"down": bool, "status": int, "retry_after": str|null, "delay_ms": int,
  "max_bytes": int|null, "refuse": str|null}: makes every receiver answer `status` (with
  `Retry-After`) while down, refuse with 400 a request whose body holds `refuse`,
  and wait `delay_ms` first; a request body over `max_bytes` is refused with 413, as Splunk's
  HEC refuses one over its `max_content_length`.
- GET /records: everything accepted so far; GET /rejected: what was refused and why;
  GET /down_hits: how many requests each path got while down (answered `status`).

Usage: outbox_receiver.py <webhook secret> <splunk token> <datadog api key> [<pagerduty routing
key>]; prints `PORT <n>`.
"""

import hashlib
import hmac
import json
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook

WEBHOOK_SECRET, SPLUNK_TOKEN, DD_KEY = sys.argv[1], sys.argv[2], sys.argv[3]
PD_KEY = sys.argv[4] if len(sys.argv) > 4 else None
LOCK = threading.Lock()
STATE = {"down": False, "status": 503, "retry_after": None, "delay_ms": 0, "max_bytes": None,
         "refuse": None}
RECORDS = {"webhook": [], "splunk": [], "datadog": [], "ndjson": {}, "slack": {}, "teams": {}, "pagerduty": []}
REJECTED = []
DOWN_HITS = {}
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
            if self.path == "/down_hits":
                return self.reply(200, DOWN_HITS)
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
            with LOCK:
                DOWN_HITS[self.path] = DOWN_HITS.get(self.path, 0) + 1
            headers = [("Retry-After", state["retry_after"])] if state["retry_after"] else []
            return self.reply(state["status"], {"error": "down"}, headers)
        if state["max_bytes"] is not None and len(raw) > state["max_bytes"]:
            return self.reject(413, f"{len(raw)} bytes", {"text": "Content too large", "code": 27})
        if state.get("refuse") and state["refuse"].encode() in raw:
            return self.reject(400, "refused on purpose", {"text": "Invalid data format", "code": 6})
        if self.path == "/webhook":
            return self.webhook(raw)
        if self.path == "/services/collector/event":
            return self.splunk(raw)
        if self.path == "/api/v2/logs":
            return self.datadog(raw)
        if self.path.startswith("/slack/"):
            return self.slack(self.path[len("/slack/"):], raw)
        if self.path.startswith("/teams/"):
            return self.teams(self.path[len("/teams/"):], raw)
        if self.path == "/pagerduty/v2/enqueue":
            return self.pagerduty(raw)
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

    def reply_text(self, status, text):
        data = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def json_body(self, raw):
        if not (self.headers.get("Content-Type") or "").startswith("application/json"):
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return None

    def slack(self, name, raw):
        msg = self.json_body(raw)
        if not isinstance(msg, dict):
            return self.reject_text(400, "invalid_payload")
        text, blocks = msg.get("text"), msg.get("blocks")
        if text is not None and not isinstance(text, str):
            return self.reject_text(400, "invalid_payload")
        if not text and not blocks:
            return self.reject_text(400, "no_text")
        why = slack_blocks_problem(blocks) if blocks is not None else None
        if why:
            return self.reject_text(400, "invalid_blocks", why)
        with LOCK:
            RECORDS["slack"].setdefault(name, []).append(msg)
        self.reply_text(200, "ok")

    def teams(self, name, raw):
        msg = self.json_body(raw)
        why = teams_problem(msg)
        if why:
            return self.reject_text(400, "Bad payload", why)
        with LOCK:
            RECORDS["teams"].setdefault(name, []).append(msg)
        self.reply_text(200, "1")

    def pagerduty(self, raw):
        ev = self.json_body(raw)
        errors = pagerduty_problems(ev)
        if errors:
            with LOCK:
                REJECTED.append({"path": self.path, "status": 400, "why": errors})
            return self.reply(
                400, {"status": "invalid event", "message": "Event object is invalid", "errors": errors}
            )
        with LOCK:
            RECORDS["pagerduty"].append(ev)
        self.reply(202, {"status": "success", "message": "Event processed", "dedup_key": ev.get("dedup_key")})

    def reject_text(self, status, text, why=None):
        with LOCK:
            REJECTED.append({"path": self.path, "status": status, "why": why or text})
        self.reply_text(status, text)


def text_object_problem(t, max_len, plain_only=False):
    if not isinstance(t, dict) or t.get("type") not in ("plain_text", "mrkdwn"):
        return f"not a text object: {t!r}"
    if plain_only and t["type"] != "plain_text":
        return "must be plain_text"
    if not isinstance(t.get("text"), str) or not t["text"]:
        return "text object without text"
    if len(t["text"]) > max_len:
        return f"text longer than {max_len}"
    return None


def slack_blocks_problem(blocks):
    """Block Kit rules for the blocks a message may carry (the ones notifications use)."""
    if not isinstance(blocks, list) or not blocks or len(blocks) > 50:
        return "blocks must be an array of 1 to 50 blocks"
    for b in blocks:
        kind = b.get("type") if isinstance(b, dict) else None
        if kind == "header":
            why = text_object_problem(b.get("text"), 150, plain_only=True)
        elif kind == "section":
            if "text" not in b and "fields" not in b:
                why = "section needs text or fields"
            elif "text" in b:
                why = text_object_problem(b["text"], 3000)
            else:
                why = None
            fields = b.get("fields")
            if why is None and fields is not None:
                if not isinstance(fields, list) or not fields or len(fields) > 10:
                    why = "fields must hold 1 to 10 text objects"
                else:
                    why = next(filter(None, (text_object_problem(f, 2000) for f in fields)), None)
        elif kind == "context":
            els = b.get("elements")
            if not isinstance(els, list) or not 1 <= len(els) <= 10:
                why = "context needs 1 to 10 elements"
            else:
                why = next(
                    filter(
                        None,
                        (None if isinstance(e, dict) and e.get("type") == "image" else text_object_problem(e, 3000)
                         for e in els),
                    ),
                    None,
                )
        elif kind == "divider":
            why = None
        else:
            why = f"unknown block type {kind!r}"
        if why:
            return f"{kind}: {why}"
    return None


def teams_element_problem(el):
    kind = el.get("type") if isinstance(el, dict) else None
    if kind == "TextBlock":
        return None if isinstance(el.get("text"), str) else "TextBlock needs a string text"
    if kind == "FactSet":
        facts = el.get("facts")
        if not isinstance(facts, list):
            return "FactSet needs facts"
        for f in facts:
            if not (isinstance(f, dict) and isinstance(f.get("title"), str) and isinstance(f.get("value"), str)):
                return f"fact must have string title and value: {f!r}"
        return None
    if kind == "RichTextBlock":
        # Inlines are TextRuns (or bare strings, their shorthand); a TextRun's text is never
        # Markdown.
        inlines = el.get("inlines")
        if not isinstance(inlines, list) or not inlines:
            return "RichTextBlock needs inlines"
        for run in inlines:
            if isinstance(run, str):
                continue
            if not (isinstance(run, dict) and run.get("type") == "TextRun" and isinstance(run.get("text"), str)):
                return f"inline must be a TextRun with a string text: {run!r}"
        return None
    if kind == "Container":
        return next(filter(None, map(teams_element_problem, el.get("items") or [])), None)
    if kind in ("ColumnSet", "Image"):
        return None
    return f"unknown element type {kind!r}"


def teams_problem(msg):
    if not isinstance(msg, dict) or msg.get("type") != "message":
        return "not a message"
    atts = msg.get("attachments")
    if not isinstance(atts, list) or not atts:
        return "no attachments"
    for a in atts:
        if not isinstance(a, dict) or a.get("contentType") != "application/vnd.microsoft.card.adaptive":
            return "attachment is not an adaptive card"
        card = a.get("content")
        if not isinstance(card, dict) or card.get("type") != "AdaptiveCard":
            return "content is not an AdaptiveCard"
        if card.get("version") not in ("1.0", "1.1", "1.2", "1.3", "1.4", "1.5"):
            return f"unsupported card version {card.get('version')!r}"
        body = card.get("body")
        if not isinstance(body, list) or not body:
            return "card without body"
        if card["version"] in ("1.0", "1.1") and any(
            isinstance(el, dict) and el.get("type") == "RichTextBlock" for el in body
        ):
            return "RichTextBlock needs card version 1.2 or later"
        why = next(filter(None, map(teams_element_problem, body)), None)
        if why:
            return why
    return None


ISO8601 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:?\d{2})$")


def pagerduty_problems(ev):
    if not isinstance(ev, dict):
        return ["Event object is invalid"]
    errors = []
    key = ev.get("routing_key")
    if not isinstance(key, str) or len(key) != 32:
        errors.append("'routing_key' must be the 32-character integration key")
    elif PD_KEY is not None and key != PD_KEY:
        errors.append("Invalid routing key")
    action = ev.get("event_action")
    if action not in ("trigger", "acknowledge", "resolve"):
        errors.append("'event_action' is invalid (must be one of: trigger, acknowledge, resolve)")
    dedup = ev.get("dedup_key")
    if dedup is not None and (not isinstance(dedup, str) or len(dedup) > 255):
        errors.append("'dedup_key' must be a string of at most 255 characters")
    if action in ("acknowledge", "resolve") and not dedup:
        errors.append("'dedup_key' is required to acknowledge or resolve")
    if action == "trigger":
        p = ev.get("payload")
        if not isinstance(p, dict):
            return errors + ["'payload' is missing or not an object"]
        s = p.get("summary")
        if not isinstance(s, str) or not s or len(s) > 1024:
            errors.append("'payload.summary' is required (at most 1024 characters)")
        if not isinstance(p.get("source"), str) or not p["source"]:
            errors.append("'payload.source' is required")
        if p.get("severity") not in ("critical", "error", "warning", "info"):
            errors.append("'payload.severity' must be one of critical, error, warning, info")
        if "timestamp" in p and not (isinstance(p["timestamp"], str) and ISO8601.match(p["timestamp"])):
            errors.append("'payload.timestamp' must be ISO 8601")
        for k in ("component", "group", "class"):
            if k in p and not isinstance(p[k], str):
                errors.append(f"'payload.{k}' must be a string")
        if "custom_details" in p and not isinstance(p["custom_details"], dict):
            errors.append("'payload.custom_details' must be an object")
    return errors


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(f"PORT {server.server_address[1]}", flush=True)
server.serve_forever()
