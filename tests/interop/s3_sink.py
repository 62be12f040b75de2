"""The S3 side of the outbox tests (host/tests/outbox.rs), from AWS's documentation and its
reference client, not from the gateway's code.

    s3_sink.py proxy <moto endpoint> <access key id> <secret access key> <region>
        Creates the bucket `audit` on the moto server (moto does not enforce signatures by
        default, and its own check mis-encodes keys holding `=`, as partitioned keys do), then
        serves a proxy in front of it that verifies every request's AWS Signature Version 4 the
        way S3 does: the canonical URI is the request path decoded and URI-encoded once, the
        signature is recomputed with botocore's `S3SigV4Auth` (the reference implementation),
        `x-amz-content-sha256` must be the SHA-256 of the body, and `x-amz-date` within 15
        minutes. A bad signature is answered 403 `SignatureDoesNotMatch` and recorded; a good
        request is forwarded to moto. Prints `PORT <n>`. GET /_rejected lists refusals.

    s3_sink.py dump <moto endpoint> <bucket>
        Reads every object back with boto3 and prints one JSON document: for each key, its
        content type, whether the body is gzip, and its decompressed NDJSON lines.
"""

import datetime
import gzip
import hashlib
import http.client
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote, unquote, urlsplit

import boto3
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials


def client(endpoint):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="reader",
        aws_secret_access_key="reader",
        config=Config(request_checksum_calculation="when_required", response_checksum_validation="when_required"),
    )


def dump(endpoint, bucket):
    s3 = client(endpoint)
    out = []
    token = None
    while True:
        kw = {"Bucket": bucket}
        if token:
            kw["ContinuationToken"] = token
        page = s3.list_objects_v2(**kw)
        for obj in page.get("Contents", []):
            got = s3.get_object(Bucket=bucket, Key=obj["Key"])
            raw = got["Body"].read()
            is_gzip = raw[:2] == b"\x1f\x8b"
            text = gzip.decompress(raw).decode() if is_gzip else ""
            out.append(
                {
                    "key": obj["Key"],
                    "content_type": got.get("ContentType"),
                    "gzip": is_gzip,
                    "lines": [json.loads(l) for l in text.splitlines() if l.strip()],
                }
            )
        if not page.get("IsTruncated"):
            break
        token = page["NextContinuationToken"]
    print(json.dumps(out))


def proxy(endpoint, akid, secret, region):
    client(endpoint).create_bucket(Bucket="audit")
    target = urlsplit(endpoint)
    rejected = []
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def answer(self, status, body, content_type="application/xml", headers=()):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def refuse(self, why):
            with lock:
                rejected.append({"path": self.path, "why": why})
            body = f"<Error><Code>SignatureDoesNotMatch</Code><Message>{why}</Message></Error>".encode()
            self.answer(403, body)

        def verify(self, body):
            auth = self.headers.get("Authorization", "")
            if not auth.startswith("AWS4-HMAC-SHA256 "):
                return "not signed with AWS4-HMAC-SHA256"
            fields = dict(p.strip().split("=", 1) for p in auth[len("AWS4-HMAC-SHA256 "):].split(","))
            cred = fields.get("Credential", "").split("/")
            if len(cred) != 5 or cred[0] != akid or cred[2] != region or cred[3] != "s3" or cred[4] != "aws4_request":
                return f"bad credential scope {fields.get('Credential')}"
            amz_date = self.headers.get("x-amz-date", "")
            try:
                when = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.timezone.utc)
            except ValueError:
                return "x-amz-date missing or malformed"
            if abs((datetime.datetime.now(datetime.timezone.utc) - when).total_seconds()) > 900:
                return "request time too skewed"
            if cred[1] != amz_date[:8]:
                return "credential date is not the request date"
            if self.headers.get("x-amz-content-sha256") != hashlib.sha256(body).hexdigest():
                return "x-amz-content-sha256 is not the body's hash"
            signed = fields.get("SignedHeaders", "").split(";")
            for required in ("host", "x-amz-date", "x-amz-content-sha256"):
                if required not in signed:
                    return f"{required} is not signed"
            headers = {k: v for k, v in self.headers.items() if k.lower() in signed}
            raw_path, _, query = self.path.partition("?")
            path = quote(unquote(raw_path), safe="/~")
            url = f"http://{self.headers['Host']}{path}" + (f"?{query}" if query else "")
            req = AWSRequest(method=self.command, url=url, data=body, headers=headers)
            req.context["timestamp"] = amz_date
            signer = S3SigV4Auth(Credentials(akid, secret), "s3", region)
            canonical = signer.canonical_request(req)
            expected = signer.signature(signer.string_to_sign(req, canonical), req)
            if fields.get("Signature") != expected:
                return "signature does not match"
            return None

        def forward(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            why = self.verify(body)
            if why:
                return self.refuse(why)
            conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            keep = [(k, v) for k, v in resp.getheaders() if k.lower() in ("etag", "x-amz-request-id")]
            self.answer(resp.status, data, resp.getheader("Content-Type") or "application/xml", keep)
            conn.close()

        def do_GET(self):
            if self.path == "/_rejected":
                with lock:
                    return self.answer(200, json.dumps(rejected).encode(), "application/json")
            self.forward()

        def do_PUT(self):
            self.forward()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(f"PORT {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    if sys.argv[1] == "dump":
        dump(sys.argv[2], sys.argv[3])
    else:
        proxy(*sys.argv[2:6])
