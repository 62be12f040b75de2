//! The S3 sink: a batch becomes gzipped objects (one per hour of event time) under
//! `<prefix>year=YYYY/month=MM/day=DD/hour=HH/`, PUT to any S3-compatible endpoint and signed
//! with AWS Signature Version 4 (implemented here on `sha2`/`hmac`; no SDK).
//!
//! The destination's URL is where objects go: path style (`https://s3.example.com/bucket`) or
//! virtual-hosted style (`https://bucket.s3.eu-west-1.amazonaws.com`); the object key is
//! appended to its path. Settings: `access_key_id` (required), `region` (default
//! `us-east-1`), `prefix` (optional); the destination's secret is the secret access key.
//! An object's key is made of the tenant and the audit ids of its first and last events, so a
//! retried batch overwrites the object it may already have written instead of adding one.
//!
//! This module must never put the secret access key anywhere but the signing key derivation,
//! and never sign a request other than the one it sends.

use std::io::Write;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::OutboxError;
use super::store::Pending;

type HmacSha256 = Hmac<Sha256>;

/// The default signing region.
pub const DEFAULT_REGION: &str = "us-east-1";

/// What the S3 sink needs from a destination's settings.
#[derive(Debug, Clone)]
pub struct S3Target {
    pub access_key_id: String,
    pub region: String,
    pub prefix: String,
}

impl S3Target {
    /// From a destination's settings; names the missing or bad setting.
    pub fn from_settings(
        settings: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self, OutboxError> {
        let get = |k: &str| {
            settings
                .get(k)
                .and_then(|v| v.as_str())
                .map(str::trim)
                .filter(|s| !s.is_empty())
        };
        let access_key_id = get("access_key_id")
            .ok_or_else(|| {
                OutboxError::Invalid("an s3 destination needs settings.access_key_id".into())
            })?
            .to_owned();
        let region = get("region").unwrap_or(DEFAULT_REGION).to_owned();
        if !region
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(OutboxError::Invalid(format!(
                "settings.region {region:?} is not a region name"
            )));
        }
        let prefix = get("prefix")
            .unwrap_or("")
            .trim_start_matches('/')
            .to_owned();
        if prefix.contains("//") || prefix.bytes().any(|b| b.is_ascii_control()) {
            return Err(OutboxError::Invalid(
                "settings.prefix must be a key prefix without empty segments".into(),
            ));
        }
        Ok(S3Target {
            access_key_id,
            region,
            prefix,
        })
    }
}

/// The hour partition of an audit event: (`YYYY`, `MM`, `DD`, `HH`) from its `ts`
/// (`2026-05-12T10:14:33.871Z`), or `None` when it has none.
pub fn hour_of(event_json: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(event_json).ok()?;
    let ts = v.get("ts")?.as_str()?;
    let b = ts.as_bytes();
    let digits = |r: std::ops::Range<usize>| {
        b.get(r.clone())
            .filter(|s| s.iter().all(u8::is_ascii_digit))
            .map(|_| &ts[r])
    };
    if b.get(4) != Some(&b'-') || b.get(7) != Some(&b'-') || b.get(10) != Some(&b'T') {
        return None;
    }
    Some(format!(
        "year={}/month={}/day={}/hour={}/",
        digits(0..4)?,
        digits(5..7)?,
        digits(8..10)?,
        digits(11..13)?
    ))
}

/// Splits a batch (oldest first) into runs of the same hour partition; an event without a
/// readable time joins the run before it (or the current hour when it is first).
pub fn by_hour(rows: &[Pending], now_partition: &str) -> Vec<(String, std::ops::Range<usize>)> {
    let mut out: Vec<(String, std::ops::Range<usize>)> = Vec::new();
    for (i, r) in rows.iter().enumerate() {
        let hour = hour_of(&r.body);
        match (out.last_mut(), hour) {
            (Some((h, range)), Some(hour)) if *h == hour => range.end = i + 1,
            (Some((_, range)), None) => range.end = i + 1,
            (_, hour) => out.push((hour.unwrap_or_else(|| now_partition.to_owned()), i..i + 1)),
        }
    }
    out
}

/// The partition of `now_ms` (for events without a time).
pub fn partition_of_ms(now_ms: i64) -> String {
    let (y, mo, d, h) = civil(now_ms.div_euclid(1000));
    format!("year={y:04}/month={mo:02}/day={d:02}/hour={h:02}/")
}

/// The object key of a run: `<prefix><partition><tenant>-<first id>.<ext>`. Keyed by its first
/// event alone: a retry re-reads its lane, whose batch may have grown (or been halved) since,
/// and must overwrite the object of the attempt whose answer was lost, not add a second copy
/// of the same events beside it.
pub fn object_key(
    prefix: &str,
    partition: &str,
    tenant: &str,
    rows: &[Pending],
    content_type: &str,
) -> String {
    let first = rows.first().map_or(0, |r| r.event_id);
    let ext = if content_type.starts_with("application/x-ndjson") {
        "ndjson.gz"
    } else if content_type.starts_with("application/json") {
        "json.gz"
    } else {
        "gz"
    };
    let mut prefix = prefix.to_owned();
    if !prefix.is_empty() && !prefix.ends_with('/') {
        prefix.push('/');
    }
    format!("{prefix}{partition}{tenant}-{first:012}.{ext}")
}

/// gzip of `body`.
pub fn gzip(body: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4 + 64),
        flate2::Compression::default(),
    );
    enc.write_all(body)?;
    enc.finish()
}

/// Percent-encodes an object key for the request path (and so for the canonical URI, which
/// S3 takes encoded once): everything but the unreserved characters and `/`.
pub fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len() * 3 / 2);
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Hex of SHA-256.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    // HMAC takes keys of any length; new_from_slice cannot fail for it.
    let mut mac = HmacSha256::new_from_slice(key).unwrap_or_else(|_| unreachable_hmac());
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

#[cold]
fn unreachable_hmac() -> HmacSha256 {
    panic!("HMAC-SHA256 refused a key")
}

/// A request to sign: the method, the path as sent (already encoded), the canonical query
/// string, and the headers to sign (any case; `host`, `x-amz-date` and
/// `x-amz-content-sha256` among them).
pub struct ToSign<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: &'a str,
    pub headers: &'a [(&'a str, &'a str)],
    pub payload_sha256: &'a str,
}

/// AWS Signature Version 4 for service `s3`: the `Authorization` header value for `req`,
/// dated `amz_date` (`YYYYMMDDTHHMMSSZ`).
pub fn authorization(
    req: &ToSign<'_>,
    access_key_id: &str,
    secret_access_key: &str,
    region: &str,
    amz_date: &str,
) -> String {
    let mut headers: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|(k, v)| {
            let v = v.split_whitespace().collect::<Vec<_>>().join(" ");
            (k.to_ascii_lowercase(), v)
        })
        .collect();
    headers.sort();
    let canonical_headers: String = headers.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    let signed_headers = headers
        .iter()
        .map(|(k, _)| k.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let canonical_request = format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        req.method, req.path, req.query, canonical_headers, signed_headers, req.payload_sha256
    );
    let date = &amz_date[..amz_date.len().min(8)];
    let scope = format!("{date}/{region}/s3/aws4_request");
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        sha256_hex(canonical_request.as_bytes())
    );
    let k_date = hmac(
        format!("AWS4{secret_access_key}").as_bytes(),
        date.as_bytes(),
    );
    let k_region = hmac(&k_date, region.as_bytes());
    let k_service = hmac(&k_region, b"s3");
    let k_signing = hmac(&k_service, b"aws4_request");
    let signature = hex(&hmac(&k_signing, string_to_sign.as_bytes()));
    format!(
        "AWS4-HMAC-SHA256 Credential={access_key_id}/{scope}, SignedHeaders={signed_headers}, Signature={signature}"
    )
}

/// `YYYYMMDDTHHMMSSZ` of `now_ms`.
pub fn amz_date(now_ms: i64) -> String {
    let secs = now_ms.div_euclid(1000);
    let (y, mo, d, h) = civil(secs);
    let rem = secs.rem_euclid(3600);
    format!("{y:04}{mo:02}{d:02}T{h:02}{:02}{:02}Z", rem / 60, rem % 60)
}

/// (year, month, day, hour) of a Unix time in seconds (Howard Hinnant's civil_from_days).
fn civil(secs: i64) -> (i64, i64, i64, i64) {
    let days = secs.div_euclid(86_400);
    let hour = secs.rem_euclid(86_400) / 3600;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d, hour)
}

#[cfg(test)]
mod tests {
    use super::*;

    const AKID: &str = "AKIAIOSFODNN7EXAMPLE";
    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";

    /// The "GET Object" example of the AWS SigV4 documentation for S3 (header-based auth).
    #[test]
    fn aws_documented_get_object_example() {
        let empty = sha256_hex(b"");
        let auth = authorization(
            &ToSign {
                method: "GET",
                path: "/test.txt",
                query: "",
                headers: &[
                    ("Host", "examplebucket.s3.amazonaws.com"),
                    ("Range", "bytes=0-9"),
                    ("x-amz-content-sha256", &empty),
                    ("x-amz-date", "20130524T000000Z"),
                ],
                payload_sha256: &empty,
            },
            AKID,
            SECRET,
            "us-east-1",
            "20130524T000000Z",
        );
        assert_eq!(
            auth,
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, \
             SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, \
             Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
    }

    /// The "PUT Object" example of the same page (a `$` in the key, encoded once).
    #[test]
    fn aws_documented_put_object_example() {
        let body = b"Welcome to Amazon S3.";
        let hash = sha256_hex(body);
        assert_eq!(
            hash,
            "44ce7dd67c959e0d3524ffac1771dfbba87d2b6b4b4e99e42034a8b803f8b072"
        );
        let auth = authorization(
            &ToSign {
                method: "PUT",
                path: &format!("/{}", encode_key("test$file.text")),
                query: "",
                headers: &[
                    ("Host", "examplebucket.s3.amazonaws.com"),
                    ("Date", "Fri, 24 May 2013 00:00:00 GMT"),
                    ("x-amz-date", "20130524T000000Z"),
                    ("x-amz-storage-class", "REDUCED_REDUNDANCY"),
                    ("x-amz-content-sha256", &hash),
                ],
                payload_sha256: &hash,
            },
            AKID,
            SECRET,
            "us-east-1",
            "20130524T000000Z",
        );
        assert!(
            auth.ends_with(
                "SignedHeaders=date;host;x-amz-content-sha256;x-amz-date;x-amz-storage-class, \
                 Signature=98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd"
            ),
            "{auth}"
        );
    }

    fn row(event_id: i64, ts: &str) -> Pending {
        Pending {
            id: event_id,
            event_id,
            created_ms: 0,
            body: serde_json::json!({"ts": ts, "tenant": "acme"}).to_string(),
        }
    }

    #[test]
    fn batches_split_at_hour_boundaries_and_keys_are_stable() {
        let rows = [
            row(1, "2026-05-12T10:59:59.999Z"),
            row(2, "2026-05-12T10:59:59.999Z"),
            row(3, "2026-05-12T11:00:00.000Z"),
            row(4, "garbage"),
            row(5, "2027-01-01T00:00:00Z"),
        ];
        let runs = by_hour(&rows, "year=2000/month=01/day=01/hour=00/");
        assert_eq!(
            runs,
            vec![
                ("year=2026/month=05/day=12/hour=10/".to_owned(), 0..2),
                ("year=2026/month=05/day=12/hour=11/".to_owned(), 2..4),
                ("year=2027/month=01/day=01/hour=00/".to_owned(), 4..5),
            ]
        );
        let key = object_key(
            "logs",
            &runs[0].0,
            "acme",
            &rows[0..2],
            "application/x-ndjson",
        );
        assert_eq!(
            key,
            "logs/year=2026/month=05/day=12/hour=10/acme-000000000001.ndjson.gz"
        );
        assert_eq!(
            encode_key(&key),
            "logs/year%3D2026/month%3D05/day%3D12/hour%3D10/acme-000000000001.ndjson.gz"
        );
    }

    #[test]
    fn dates() {
        assert_eq!(amz_date(0), "19700101T000000Z");
        assert_eq!(amz_date(1_369_353_600_000), "20130524T000000Z");
        assert_eq!(
            partition_of_ms(1_778_580_873_871),
            "year=2026/month=05/day=12/hour=10/"
        );
        let gz = gzip(b"hello\n").expect("gzip");
        assert_eq!(&gz[..2], &[0x1f, 0x8b]);
    }
}
