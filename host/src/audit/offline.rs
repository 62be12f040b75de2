//! Offline verification of an NDJSON export (`intentgate audit verify --file export.ndjson
//! --checkpoint cp.txt --public-key KEY`): no gateway and no database, only the file, a signed
//! checkpoint kept somewhere else, and the log's public key.
//!
//! The export's lines of the checkpoint's tenant must be a contiguous run of the chain (any
//! start: the checkpoint authenticates everything from the first line up to its size, because
//! each hash commits to all before it). For each line the verifier recomputes
//! `SHA-256(prev_hash || JCS(line without id, hash, prev_hash))`, checks the links and positions,
//! and compares the hash at the checkpoint's size with the signed root. Lines of other tenants are
//! counted and ignored. Events after the checkpoint are linked to it but not covered by a
//! signature; they are reported as `beyond_checkpoint`.
//!
//! This module must never report `ok` unless the checkpoint's signature verified and the chain
//! reached the checkpoint's size with the signed hash; it reads the file once, line by line.

use std::fmt;
use std::io::{BufRead, Read as _};

use serde::Serialize;
use serde_json::Value;

use super::checkpoint::{Checkpoint, origin_for};
use super::key::{Verifier, hex};
use super::log::{GENESIS, link_hash};
use super::{AuditError, jcs};

/// Longest line accepted (an event with raw argument values can be large, not unbounded): a
/// request body may be 64 MiB (`INTENTGATE_MAX_BODY_BYTES` at its most), and its arguments'
/// canonical text up to six times that (a control character is written `\u0000`), so an honest
/// export's line always fits.
pub const MAX_LINE_BYTES: u64 = 6 * (64 << 20) + (16 << 20);

/// Members an export line carries beside the hashed event.
pub const CHAIN_FIELDS: [&str; 3] = ["id", "hash", "prev_hash"];

/// Result of an offline verification.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Report {
    pub ok: bool,
    pub origin: String,
    /// The tenant the checkpoint is for (from the lines that matched it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub checkpoint_size: u64,
    /// Hex of the signed root hash.
    pub checkpoint_root: String,
    /// Lines of the tenant whose links were checked and hold.
    pub events_checked: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<u64>,
    /// Checked events after the checkpoint's size (linked, not signed).
    pub beyond_checkpoint: u64,
    /// Lines of other tenants (ignored).
    pub other_tenant_lines: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broken: Option<Broken>,
}

/// The first problem found.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Broken {
    /// 1-based line number in the file (0: not tied to a line).
    pub line: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    pub reason: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub stored_hash: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub expected_hash: String,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}", if self.ok { "OK" } else { "FAILED" })?;
        writeln!(f, "origin:            {}", self.origin)?;
        writeln!(f, "checkpoint size:   {}", self.checkpoint_size)?;
        writeln!(f, "events checked:    {}", self.events_checked)?;
        if let (Some(a), Some(b)) = (self.first_seq, self.last_seq) {
            writeln!(f, "chain positions:   {a}..={b}")?;
        }
        writeln!(f, "beyond checkpoint: {}", self.beyond_checkpoint)?;
        writeln!(f, "other tenants:     {} lines", self.other_tenant_lines)?;
        if let Some(b) = &self.broken {
            write!(f, "broken at line {}", b.line)?;
            if let Some(seq) = b.seq {
                write!(f, " (seq {seq}")?;
                if let Some(id) = b.id {
                    write!(f, ", id {id}")?;
                }
                write!(f, ")")?;
            }
            writeln!(f, ": {}", b.reason)?;
            if !b.stored_hash.is_empty() {
                writeln!(f, "  stored:   {}", b.stored_hash)?;
                writeln!(f, "  expected: {}", b.expected_hash)?;
            }
        }
        Ok(())
    }
}

/// Opens `checkpoint` with `public_key`: a verifier key (`name+hash+base64`) or a bare base64
/// Ed25519 public key, which is tried under each signer name on the checkpoint.
fn open_checkpoint(
    checkpoint: &str,
    public_key: &str,
) -> Result<(Checkpoint, Verifier), AuditError> {
    let public_key = public_key.trim();
    if !Verifier::is_bare_key(public_key) {
        let v = Verifier::parse(public_key, "")?;
        return Ok((Checkpoint::open(checkpoint, &v)?, v));
    }
    let names = checkpoint
        .lines()
        .filter_map(|l| l.strip_prefix("\u{2014} "))
        .filter_map(|l| l.split(' ').next());
    let mut last_err = AuditError::InvalidCheckpoint("no signature lines".into());
    for name in names {
        // A signature line under a name no key could have (another witness's, a stray line)
        // is passed over, not taken as the answer: the log's own may come after it.
        let v = match Verifier::parse(public_key, name) {
            Ok(v) => v,
            Err(e) => {
                last_err = e;
                continue;
            }
        };
        match Checkpoint::open(checkpoint, &v) {
            Ok(cp) => return Ok((cp, v)),
            Err(e) => last_err = e,
        }
    }
    Err(last_err)
}

/// Verifies an NDJSON export against a signed checkpoint and the log's public key.
///
/// Errors mean the inputs could not be used (unreadable file, malformed key, a checkpoint not
/// signed by that key); a verdict about the file, good or bad, is an `Ok(Report)`.
pub fn verify_export(
    mut ndjson: impl BufRead,
    checkpoint: &str,
    public_key: &str,
) -> Result<Report, AuditError> {
    let (cp, verifier) = open_checkpoint(checkpoint, public_key)?;
    let mut report = Report {
        ok: false,
        origin: cp.origin.clone(),
        tenant: None,
        checkpoint_size: cp.size,
        checkpoint_root: hex::encode(&cp.root_hash),
        events_checked: 0,
        first_seq: None,
        last_seq: None,
        beyond_checkpoint: 0,
        other_tenant_lines: 0,
        broken: None,
    };
    let mut prev: Option<[u8; 32]> = None;
    let mut reached = false;
    let mut line_no = 0u64;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = std::io::Read::by_ref(&mut ndjson)
            .take(MAX_LINE_BYTES + 1)
            .read_until(b'\n', &mut buf)?;
        if n == 0 {
            break;
        }
        line_no += 1;
        if n as u64 > MAX_LINE_BYTES {
            return Err(AuditError::Malformed(format!("line {line_no} is too long")));
        }
        let fail = |reason: String,
                    id: Option<i64>,
                    seq: Option<u64>,
                    stored: String,
                    expected: String| {
            Broken {
                line: line_no,
                id,
                seq,
                reason,
                stored_hash: stored,
                expected_hash: expected,
            }
        };
        let Ok(text) = std::str::from_utf8(&buf) else {
            report.broken = Some(fail(
                "line is not UTF-8".into(),
                None,
                None,
                String::new(),
                String::new(),
            ));
            break;
        };
        let text = text.trim_end_matches(['\n', '\r']);
        if text.trim().is_empty() {
            continue;
        }
        let Ok(meta) = serde_json::from_str::<Value>(text) else {
            report.broken = Some(fail(
                "line is not JSON".into(),
                None,
                None,
                String::new(),
                String::new(),
            ));
            break;
        };
        let tenant = meta.get("tenant").and_then(Value::as_str).unwrap_or("");
        if origin_for(verifier.name(), tenant) != cp.origin {
            report.other_tenant_lines += 1;
            continue;
        }
        if report.tenant.is_none() {
            report.tenant = Some(tenant.to_owned());
        }
        let id = meta.get("id").and_then(Value::as_i64);
        let seq = meta.get("seq").and_then(Value::as_u64);
        let stored = meta
            .get("hash")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let (Some(seq), Some(stored_bytes), Some(prev_hash)) = (
            seq,
            hex::decode32(&stored),
            meta.get("prev_hash")
                .and_then(Value::as_str)
                .and_then(hex::decode32),
        ) else {
            report.broken = Some(fail(
                "line lacks seq, hash or prev_hash".into(),
                id,
                seq,
                stored,
                String::new(),
            ));
            break;
        };
        let expected_prev = match prev {
            Some(p) => p,
            None => {
                report.first_seq = Some(seq);
                // The first line's prev_hash is taken as given (the checkpoint vouches for it),
                // except at the start of the chain where it must be the genesis value.
                if seq == 1 { GENESIS } else { prev_hash }
            }
        };
        if let Some(last) = report.last_seq
            && Some(seq) != last.checked_add(1)
        {
            report.broken = Some(fail(
                format!("gap: expected seq {}, found {seq}", u128::from(last) + 1),
                Some(id.unwrap_or(0)),
                Some(seq),
                stored,
                String::new(),
            ));
            break;
        }
        if prev_hash != expected_prev {
            report.broken = Some(fail(
                "prev_hash mismatch".into(),
                id,
                Some(seq),
                hex::encode(&prev_hash),
                hex::encode(&expected_prev),
            ));
            break;
        }
        let canonical = match jcs::canonicalize_text(text, &CHAIN_FIELDS) {
            Ok(c) => c,
            Err(e) => {
                report.broken = Some(fail(e.to_string(), id, Some(seq), stored, String::new()));
                break;
            }
        };
        let computed = link_hash(&expected_prev, canonical.as_bytes());
        if computed != stored_bytes {
            report.broken = Some(fail(
                "hash mismatch".into(),
                id,
                Some(seq),
                stored,
                hex::encode(&computed),
            ));
            break;
        }
        if seq == cp.size {
            if computed != cp.root_hash {
                report.broken = Some(fail(
                    "chain hash at the checkpoint's size differs from the signed root: history was rewritten".into(),
                    id,
                    Some(seq),
                    stored,
                    hex::encode(&cp.root_hash),
                ));
                break;
            }
            reached = true;
        } else if seq > cp.size {
            report.beyond_checkpoint += 1;
        }
        report.events_checked += 1;
        report.last_seq = Some(seq);
        prev = Some(computed);
    }
    if report.broken.is_none() && !reached {
        let reason = match (report.first_seq, report.last_seq) {
            (Some(first), _) if first > cp.size => format!(
                "the export starts at seq {first}, after the checkpoint's size {}",
                cp.size
            ),
            (_, Some(last)) => format!(
                "truncated: the export ends at seq {last}, the checkpoint covers {}",
                cp.size
            ),
            _ if cp.size == 0 => String::new(),
            _ => "the export holds no event of the checkpoint's tenant".into(),
        };
        if !reason.is_empty() {
            report.broken = Some(Broken {
                line: 0,
                id: None,
                seq: None,
                reason,
                stored_hash: String::new(),
                expected_hash: String::new(),
            });
        }
    }
    report.ok = report.broken.is_none();
    Ok(report)
}
