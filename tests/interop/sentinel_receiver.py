"""A local Microsoft Sentinel for the outbox tests (host/tests/outbox.rs), written from
Microsoft's documentation (the Microsoft identity platform's client-credentials flow and the
Azure Monitor Logs Ingestion API), not from the gateway's code.

- POST /<directory>/oauth2/v2.0/token: the OAuth 2.0 client-credentials grant. The body is
  `application/x-www-form-urlencoded` with `grant_type=client_credentials`, `client_id`,
  `client_secret` and `scope`, which must be `https://monitor.azure.com//.default` for the
  Logs Ingestion API. Answers 200 `{"token_type": "Bearer", "expires_in": …, "ext_expires_in":
  …, "access_token": …}`; 400 `unsupported_grant_type` / `invalid_request` / `invalid_scope`,
  401 `invalid_client` for a wrong secret.
- POST /dataCollectionRules/<DCR immutable id>/streams/<stream>?api-version=2023-01-01: the
  Logs Ingestion API. `Authorization: Bearer <token>` (401 otherwise), `Content-Type:
  application/json` (optionally `Content-Encoding: gzip`), a body of at most 1 MB (413), a
  JSON array of objects (400), each with a `TimeGenerated` datetime as the stream declares
  (400). An unknown rule is 404, a stream the rule does not declare 400. Answers 204.
- POST /control {"revoke": true, "expires_in": n}: revokes every token issued so far / sets
  the lifetime of the next ones.
- GET /records: `{"records": [...], "token_requests": n, "tokens_issued": n, "calls": n}`;
  GET /rejected.

Usage: sentinel_receiver.py <directory id> <client id> <client secret> <DCR immutable id>
<stream>; prints `PORT <n>`.
"""

import datetime
import gzip
import json
import secrets
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

DIRECTORY, CLIENT_ID, CLIENT_SECRET, DCR, STREAM = sys.argv[1:6]
SCOPE = "https://monitor.azure.com//.default"
LOCK = threading.Lock()
STATE = {"tokens": set(), "expires_in": 3599, "token_requests": 0, "tokens_issued": 0, "calls": 0}
RECORDS = []
REJECTED = []


def iso_datetime(v):
    if not isinstance(v, str):
        return False
    try:
        datetime.datetime.fromisoformat(v.replace("Z", "+00:00"))
        return True
    except ValueError:
        return False


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status, body=None):
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        if body is not None:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def reject(self, status, body):
        with LOCK:
            REJECTED.append({"path": self.path, "status": status, "body": body})
        self.reply(status, body)

    def do_GET(self):
        with LOCK:
            if self.path == "/records":
                return self.reply(
                    200,
                    {
                        "records": RECORDS,
                        "token_requests": STATE["token_requests"],
                        "tokens_issued": STATE["tokens_issued"],
                        "calls": STATE["calls"],
                    },
                )
            if self.path == "/rejected":
                return self.reply(200, REJECTED)
        self.reply(404, {})

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        url = urlsplit(self.path)
        if url.path == "/control":
            change = json.loads(raw)
            with LOCK:
                if change.get("revoke"):
                    STATE["tokens"].clear()
                if "expires_in" in change:
                    STATE["expires_in"] = change["expires_in"]
            return self.reply(200, {})
        if url.path == f"/{DIRECTORY}/oauth2/v2.0/token":
            return self.token(raw)
        if url.path.startswith("/dataCollectionRules/"):
            return self.ingest(url, raw)
        self.reply(404, {})

    def token(self, raw):
        with LOCK:
            STATE["token_requests"] += 1
        if not (self.headers.get("Content-Type") or "").startswith("application/x-www-form-urlencoded"):
            return self.reject(400, {"error": "invalid_request", "error_description": "form body expected"})
        form = {k: v[0] for k, v in parse_qs(raw.decode(), keep_blank_values=True).items()}
        if form.get("grant_type") != "client_credentials":
            return self.reject(400, {"error": "unsupported_grant_type"})
        if form.get("scope") != SCOPE:
            return self.reject(400, {"error": "invalid_scope", "error_description": f"scope {form.get('scope')!r}"})
        if form.get("client_id") != CLIENT_ID or form.get("client_secret") != CLIENT_SECRET:
            return self.reject(
                401,
                {"error": "invalid_client", "error_description": "AADSTS7000215: Invalid client secret provided."},
            )
        token = secrets.token_urlsafe(32)
        with LOCK:
            STATE["tokens"].add(token)
            STATE["tokens_issued"] += 1
            expires = STATE["expires_in"]
        self.reply(200, {"token_type": "Bearer", "expires_in": expires, "ext_expires_in": expires, "access_token": token})

    def ingest(self, url, raw):
        with LOCK:
            STATE["calls"] += 1
        parts = url.path.split("/")
        # ["", "dataCollectionRules", dcr, "streams", stream]
        if len(parts) != 5 or parts[3] != "streams":
            return self.reject(404, {"error": {"code": "NotFound"}})
        if parse_qs(url.query).get("api-version") != ["2023-01-01"]:
            return self.reject(400, {"error": {"code": "InvalidApiVersion"}})
        auth = self.headers.get("Authorization", "")
        with LOCK:
            valid = auth.startswith("Bearer ") and auth[len("Bearer "):] in STATE["tokens"]
        if not valid:
            return self.reject(401, {"error": {"code": "InvalidToken", "message": "token is not valid"}})
        if parts[2] != DCR:
            return self.reject(404, {"error": {"code": "InvalidDataCollectionRule"}})
        if parts[4] != STREAM:
            return self.reject(400, {"error": {"code": "InvalidStream"}})
        if not (self.headers.get("Content-Type") or "").startswith("application/json"):
            return self.reject(415, {"error": {"code": "UnsupportedMediaType"}})
        if len(raw) > 1024 * 1024:
            return self.reject(413, {"error": {"code": "ContentLengthLimitExceeded"}})
        if self.headers.get("Content-Encoding") == "gzip":
            raw = gzip.decompress(raw)
        try:
            records = json.loads(raw)
        except ValueError:
            return self.reject(400, {"error": {"code": "InvalidContent", "message": "not JSON"}})
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            return self.reject(400, {"error": {"code": "InvalidContent", "message": "expected an array of objects"}})
        for r in records:
            if not iso_datetime(r.get("TimeGenerated")):
                return self.reject(400, {"error": {"code": "InvalidContent", "message": "TimeGenerated"}})
        with LOCK:
            RECORDS.extend(records)
        self.reply(204)


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(f"PORT {server.server_address[1]}", flush=True)
server.serve_forever()
