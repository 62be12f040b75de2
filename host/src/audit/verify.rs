//! Verifying a tenant's chain in the database (`GET /v1/admin/audit/verify`).
//!
//! The walk reads the head first and then every event up to it in chain order, checking for
//! each: the position follows the previous one (no gap), `prev_hash` is the previous hash,
//! `hash = SHA-256(prev_hash || body)`, and the body agrees with the row's indexed columns (so a
//! filter cannot be made to hide an event). It then checks that the head row names the last
//! event, and checks the chain against the newest stored checkpoint and, when given, a checkpoint
//! kept outside the database: only the latter detects a consistent rewrite of the whole chain, or
//! a tail deleted together with its head and its stored checkpoints.
//!
//! On SQLite the walk also checks, page by page, that the query's lookup tables (`facets.rs`)
//! hold every entry of each event they cover: they answer the filtered lists, and an entry
//! deleted from that file would hide its event from a filter while the chain still holds.
//!
//! `skipped` counts the events after the first break, which the walk does not vouch for.
//! This module must never report `ok` for a chain it did not walk to its head.

use serde::Serialize;
use serde_json::Value;

use super::checkpoint::{Checkpoint, origin_for};
use super::key::{Verifier, hex};
use super::log::{GENESIS, link_hash};
use super::query::{self, ChainRow};
use super::{AuditError, Db, time};

/// The answer of a verification (always served with HTTP 200).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct VerifyReport {
    pub ok: bool,
    pub tenant: String,
    /// Events whose links were checked and hold.
    pub verified: u64,
    /// Events after the first break (not vouched for).
    pub skipped: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broken_at: Option<BrokenAt>,
    /// Time of the newest event walked and found intact (chain freshness; `head_id` its id),
    /// never the head row's own claim; omitted for an empty chain.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub head_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub head_id: Option<i64>,
    /// Chain length according to the head row.
    pub head_seq: u64,
    /// Checks against signed checkpoints (stored newest, and the one given by the caller).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub checkpoints: Vec<CheckpointCheck>,
    /// On SQLite, the first walked event the query's lookup tables would not list under one
    /// of its filters (the chain itself may hold).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unlisted: Option<UnlistedAt>,
}

/// An event in the chain that a filtered list would not show: the lookup file
/// (`<database>-facets`) covers it but lacks its entry.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct UnlistedAt {
    pub id: i64,
    pub seq: i64,
    /// The filter that would miss it (`agent_id`, `tool`, `time`, `jti` or `root_jti`).
    pub filter: String,
    pub reason: String,
}

/// Where and why the chain breaks.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BrokenAt {
    pub id: i64,
    pub seq: i64,
    pub ts: String,
    pub stored_hash: String,
    pub expected_hash: String,
    pub reason: String,
}

/// A break found at the chain's head row (`seq` as reported), against the last hash walked.
fn at_head(h: &query::HeadRow, seq: i64, prev: &[u8], reason: String) -> BrokenAt {
    BrokenAt {
        id: h.event_id,
        seq,
        ts: time::format_rfc3339_ms(h.ts_ms),
        stored_hash: h.hash.clone(),
        expected_hash: hex::encode(prev),
        reason,
    }
}

/// The outcome of checking the chain against one signed checkpoint.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CheckpointCheck {
    /// `stored` (newest in the database) or `given` (by the caller).
    pub source: &'static str,
    pub size: u64,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Compares a row's indexed columns with its hashed body; names the first that disagrees.
pub(crate) fn column_mismatch(row: &ChainRow, body: &Value, tenant: &str) -> Option<&'static str> {
    let s = |k: &str| body.get(k).and_then(Value::as_str).unwrap_or("");
    let r = &row.record;
    if s("tenant") != tenant || r.tenant != tenant {
        return Some("tenant");
    }
    if body.get("seq").and_then(Value::as_i64) != Some(r.seq) {
        return Some("seq");
    }
    if s("ts") != time::format_rfc3339_ms(r.ts_ms) {
        return Some("ts");
    }
    let pairs = [
        ("event", &row.event, "event"),
        ("decision", &row.decision, "decision"),
        ("check", &row.check_name, "check"),
        ("agent_id", &row.agent_id, "agent_id"),
        ("tool", &row.tool, "tool"),
        ("capability_token_id", &row.jti, "jti"),
        ("root_capability_token_id", &row.root_jti, "root_jti"),
        ("elevation_id", &row.elevation_id, "elevation_id"),
    ];
    pairs
        .into_iter()
        .find(|(k, col, _)| s(k) != col.as_str())
        .map(|(_, _, name)| name)
}

/// A checkpoint to check during the walk.
struct Target {
    source: &'static str,
    cp: Checkpoint,
    result: Option<Result<(), String>>,
}

/// Walks `tenant`'s chain. `given` is a signed checkpoint note kept outside the database;
/// `verifier` is the log's public key. Errors only when the database cannot be read or the
/// given checkpoint is not a valid signed note (a verdict is never an error).
pub async fn verify_chain(
    db: &Db,
    tenant: &str,
    verifier: &Verifier,
    given: Option<&str>,
) -> Result<VerifyReport, AuditError> {
    let mut report = VerifyReport {
        ok: true,
        tenant: tenant.to_owned(),
        verified: 0,
        skipped: 0,
        broken_at: None,
        head_at: None,
        head_id: None,
        head_seq: 0,
        checkpoints: Vec::new(),
        unlisted: None,
    };
    let origin = origin_for(verifier.name(), tenant);
    let mut targets: Vec<Target> = Vec::new();
    if let Some(note) = given {
        let cp = Checkpoint::open(note, verifier)?;
        if cp.origin != origin {
            return Err(AuditError::InvalidCheckpoint(format!(
                "checkpoint is for {:?}, not {origin:?}",
                cp.origin
            )));
        }
        targets.push(Target {
            source: "given",
            cp,
            result: None,
        });
    }
    if let Some(row) = query::latest_checkpoint(db, tenant).await? {
        match Checkpoint::open(&row.note, verifier) {
            Ok(cp) if cp.origin == origin && cp.size == row.size as u64 => targets.push(Target {
                source: "stored",
                cp,
                result: None,
            }),
            Ok(_) => report.checkpoints.push(CheckpointCheck {
                source: "stored",
                size: row.size.max(0) as u64,
                ok: false,
                reason: Some("stored checkpoint does not match its row or this tenant".into()),
            }),
            Err(e) => report.checkpoints.push(CheckpointCheck {
                source: "stored",
                size: row.size.max(0) as u64,
                ok: false,
                reason: Some(e.to_string()),
            }),
        }
    }

    let head = query::head(db, tenant).await?;
    let head_seq = head.as_ref().map(|h| h.seq).unwrap_or(0);
    report.head_seq = head_seq.max(0) as u64;

    // Without a head row, walk everything: rows without a head are themselves a finding.
    let walk_to = if head.is_some() { head_seq } else { i64::MAX };
    let mut prev = GENESIS;
    let mut last_seq = 0i64;
    // The newest event walked and found intact: its time and id, not the head row's (which
    // the walk does not check), say how fresh the chain is.
    let mut last_walked: Option<(i64, i64)> = None;
    'walk: loop {
        let page = query::chain_page(db, tenant, last_seq, walk_to, 1000).await?;
        if page.is_empty() {
            break;
        }
        let page_from = last_seq;
        for row in page {
            let r = &row.record;
            let computed = link_hash(&prev, r.body.as_bytes());
            let computed_hex = hex::encode(&computed);
            let broken = |reason: String, stored: &str, expected: &str| BrokenAt {
                id: r.id,
                seq: r.seq,
                ts: time::format_rfc3339_ms(r.ts_ms),
                stored_hash: stored.to_owned(),
                expected_hash: expected.to_owned(),
                reason,
            };
            let fault = if r.seq != last_seq + 1 {
                Some(broken(
                    format!("gap: expected seq {}, found {}", last_seq + 1, r.seq),
                    &r.prev_hash,
                    &hex::encode(&prev),
                ))
            } else if r.prev_hash != hex::encode(&prev) {
                Some(broken(
                    "prev_hash mismatch".into(),
                    &r.prev_hash,
                    &hex::encode(&prev),
                ))
            } else if r.hash != computed_hex {
                Some(broken("hash mismatch".into(), &r.hash, &computed_hex))
            } else {
                match serde_json::from_str::<Value>(&r.body) {
                    Err(_) => Some(broken("body is not JSON".into(), &r.hash, &computed_hex)),
                    Ok(body) => column_mismatch(&row, &body, tenant).map(|col| {
                        broken(
                            format!("column {col} disagrees with the hashed event"),
                            &r.hash,
                            &computed_hex,
                        )
                    }),
                }
            };
            if let Some(b) = fault {
                report.skipped = query::count_after(db, tenant, last_seq).await?.max(0) as u64;
                report.broken_at = Some(b);
                break 'walk;
            }
            for t in targets.iter_mut().filter(|t| t.cp.size == r.seq as u64) {
                t.result = Some(if t.cp.root_hash == computed {
                    Ok(())
                } else {
                    Err(format!(
                        "chain hash at size {} differs from the checkpoint: history was rewritten",
                        t.cp.size
                    ))
                });
            }
            prev = computed;
            last_seq = r.seq;
            last_walked = Some((r.ts_ms, r.id));
            report.verified += 1;
        }
        // The page's rows agree with their hashed bodies, so their columns are what the
        // lookup tables must hold.
        if report.unlisted.is_none()
            && let Some(u) = query::first_unlisted(db, tenant, page_from, last_seq).await?
        {
            report.unlisted = Some(UnlistedAt {
                reason: format!(
                    "the audit lookup file (<database>-facets) has no {} entry for this event, so a list filtered by it would not show the event: the file was edited or damaged. Keep it as evidence; then stop the gateway and delete it (with its -wal and -shm) to have it entered again",
                    u.filter
                ),
                id: u.id,
                seq: u.seq,
                filter: u.filter,
            });
        }
    }

    if let Some((ts_ms, id)) = last_walked {
        report.head_at = Some(time::format_rfc3339_ms(ts_ms));
        report.head_id = Some(id);
    }

    if report.broken_at.is_none() && last_seq != head_seq {
        // The head claims events that are not there (a deleted tail), or lost its row.
        let h = head.as_ref();
        report.broken_at = Some(BrokenAt {
            id: h.map(|h| h.event_id).unwrap_or(0),
            seq: head_seq,
            ts: h
                .map(|h| time::format_rfc3339_ms(h.ts_ms))
                .unwrap_or_default(),
            stored_hash: h.map(|h| h.hash.clone()).unwrap_or_default(),
            expected_hash: hex::encode(&prev),
            reason: format!("chain head says {head_seq} events, the chain has {last_seq}"),
        });
    } else if report.broken_at.is_none()
        && let Some(h) = head.as_ref().filter(|h| h.hash != hex::encode(&prev))
    {
        report.broken_at = Some(at_head(
            h,
            h.seq,
            &prev,
            "chain head hash does not match the last event".into(),
        ));
    }

    if report.broken_at.is_none()
        && let Some(h) = head.as_ref()
    {
        // Rows above the head were not written by the chain's writer (which moves the head in
        // the same transaction). Read the rows first and the head after: a row appended
        // meanwhile is under the head read second.
        let highest = query::max_seq(db, tenant).await?;
        let now_head = query::head(db, tenant).await?.map_or(h.seq, |h| h.seq);
        // Rows the walk did not see but a list or an export shows: a seq below 1, or one
        // repeated (the walk reads each seq once).
        let claimed = query::count_upto(db, tenant, h.seq).await?;
        if claimed != report.verified as i64 {
            let reason = format!(
                "{claimed} rows claim a place up to seq {} in the chain, which has {}: rows were written outside the chain's writer (a seq below 1 or repeated), and lists and exports show them",
                h.seq, report.verified
            );
            report.broken_at = Some(at_head(h, h.seq, &prev, reason));
        } else if highest > now_head {
            let reason = format!(
                "events up to seq {highest} lie beyond the chain head ({now_head}): written outside the chain's writer, or the head was moved back"
            );
            report.broken_at = Some(at_head(h, now_head, &prev, reason));
        }
    }

    for t in targets {
        let result = match t.result {
            Some(r) => r,
            None if report.broken_at.is_some() => {
                Err("chain breaks before the checkpoint's size".to_owned())
            }
            None => Err(format!(
                "truncated: the checkpoint covers {} events, the chain has {last_seq}",
                t.cp.size
            )),
        };
        report.checkpoints.push(CheckpointCheck {
            source: t.source,
            size: t.cp.size,
            ok: result.is_ok(),
            reason: result.err(),
        });
    }
    report.ok = report.broken_at.is_none()
        && report.unlisted.is_none()
        && report.checkpoints.iter().all(|c| c.ok);
    Ok(report)
}
