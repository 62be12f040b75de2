//! Streaming export of audit events as CSV (spreadsheets) or NDJSON (lossless; what the offline
//! verifier reads).
//!
//! A producer task pages through the store (keyset on `id`, oldest first, up to the largest id
//! that existed when the export started, so the file is finite and consistent) and sends
//! formatted chunks through a bounded channel to the response body: memory stays at a few
//! chunks whatever the export's size. A store error mid-stream ends the body with an error, so
//! the client sees an aborted transfer, never a silently short file.
//!
//! CSV cells are quoted per RFC 4180, and a cell starting with `=`, `+`, `-`, `@`, tab or CR is
//! prefixed with `'` so a spreadsheet does not evaluate it as a formula.
//! This module must never buffer a whole export, and never write a CSV cell a spreadsheet executes.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use serde_json::Value;
use tokio::sync::mpsc;

use super::query::{self, AuditFilter, AuditRecord};
use super::{AuditError, Db, time};

/// Rows fetched per page.
pub const PAGE_ROWS: u32 = 500;
/// A chunk is sent once it reaches this many bytes (or at the end of a page).
pub const CHUNK_BYTES: usize = 256 * 1024;
/// Chunks that may wait for the client.
const CHANNEL_CHUNKS: usize = 2;

/// Export format (`format=csv`, the default, or `format=json` / `ndjson`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Csv,
    Ndjson,
}

impl Format {
    pub fn from_param(v: Option<&str>) -> Result<Self, AuditError> {
        match v.unwrap_or("") {
            "" | "csv" => Ok(Format::Csv),
            "json" | "ndjson" | "jsonl" => Ok(Format::Ndjson),
            other => Err(AuditError::InvalidQuery(format!(
                "format must be csv or json, not {other:?}"
            ))),
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Csv => "text/csv; charset=utf-8",
            Format::Ndjson => "application/x-ndjson",
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::Ndjson => "ndjson",
        }
    }
}

/// `intentgate-audit-<tenant|all>-<YYYYMMDDTHHMMSSZ>.<ext>`, safe in a header.
pub fn filename(tenant: Option<&str>, now_ms: i64, format: Format) -> String {
    let scope: String = tenant
        .unwrap_or("all")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    format!(
        "intentgate-audit-{scope}-{}.{}",
        time::format_compact(now_ms),
        format.extension()
    )
}

/// The `Content-Disposition` header value for an export.
pub fn content_disposition(tenant: Option<&str>, now_ms: i64, format: Format) -> String {
    format!(
        "attachment; filename=\"{}\"",
        filename(tenant, now_ms, format)
    )
}

/// CSV columns, in order.
pub const CSV_COLUMNS: [&str; 32] = [
    "id",
    "seq",
    "ts",
    "tenant",
    "event",
    "decision",
    "check",
    "reason",
    "agent_id",
    "session_id",
    "tool",
    "arg_keys",
    "arg_values",
    "capability_token_id",
    "root_capability_token_id",
    "caveat_count",
    "intent_summary",
    "requires_step_up",
    "decided_by",
    "pending_id",
    "elevation_id",
    "bundle_digest",
    "latency_ms",
    "upstream_status",
    "upstream",
    "remote_ip",
    "call_id",
    "round",
    "schema_version",
    "prev_hash",
    "hash",
    // Last, so the columns before it keep their places: the denials one throttled record
    // stands for (`intentgate.denials_throttled`), empty for every other event.
    "count",
];

/// Appends one CSV cell (without separator), quoted when needed and defused against formulas.
/// A `;` is quoted too: a spreadsheet in a locale whose list separator it is splits an
/// unquoted cell there, and the piece after it (`0;=cmd|…`) would start a formula of its own.
pub fn csv_cell(value: &str, out: &mut String) {
    let formula = matches!(
        value.as_bytes().first(),
        Some(b'=' | b'+' | b'-' | b'@' | b'\t' | b'\r')
    );
    let quote = formula || value.contains([',', ';', '"', '\n', '\r']);
    if quote {
        out.push('"');
    }
    if formula {
        out.push('\'');
    }
    for c in value.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    if quote {
        out.push('"');
    }
}

pub fn csv_header() -> String {
    let mut s = CSV_COLUMNS.join(",");
    s.push_str("\r\n");
    s
}

/// One CSV line (CRLF-terminated) for a stored event.
pub fn csv_row(rec: &AuditRecord, out: &mut String) {
    let body = rec.body_value();
    for (i, col) in CSV_COLUMNS.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let cell = match *col {
            "id" => rec.id.to_string(),
            "seq" => rec.seq.to_string(),
            "prev_hash" => rec.prev_hash.clone(),
            "hash" => rec.hash.clone(),
            "arg_keys" => match body.get("arg_keys") {
                Some(Value::Array(keys)) => keys
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(";"),
                _ => String::new(),
            },
            key => match body.get(key) {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
            },
        };
        csv_cell(&cell, out);
    }
    out.push_str("\r\n");
}

/// The response body of an export: chunks from the producer task.
pub struct ExportBody {
    rx: mpsc::Receiver<Result<Bytes, AuditError>>,
}

impl Body for ExportBody {
    type Data = Bytes;
    type Error = AuditError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, AuditError>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|r| r.map(Frame::data)))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl ExportBody {
    /// Next chunk (for callers that are not an HTTP server, e.g. tests and the CLI).
    pub async fn next_chunk(&mut self) -> Option<Result<Bytes, AuditError>> {
        self.rx.recv().await
    }
}

/// Starts exporting `filter` in `format`. The returned body yields the file.
pub fn stream(db: Db, filter: AuditFilter, format: Format) -> ExportBody {
    stream_durable(db, filter, format, super::DurableMark::default())
}

/// [`stream`], of events a power cut can no longer take back: the export waits for `durable`
/// to cover what it will read (SQLite syncs its log beside the writer, so a commit is visible
/// a moment before it is durable, and an export of that moment could hold events that a power
/// cut then rolls back and gives other events' seqs).
pub fn stream_durable(
    db: Db,
    filter: AuditFilter,
    format: Format,
    durable: super::DurableMark,
) -> ExportBody {
    let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
    tokio::spawn(async move {
        if let Err(e) = produce(&db, &filter, format, &tx, &durable).await {
            tracing::warn!(error = %e, "audit export failed mid-stream");
            let _ = tx.send(Err(e)).await;
        }
    });
    ExportBody { rx }
}

/// Pages through the store and sends chunks; returns early (Ok) when the client went away.
async fn produce(
    db: &Db,
    filter: &AuditFilter,
    format: Format,
    tx: &mpsc::Sender<Result<Bytes, AuditError>>,
    durable: &super::DurableMark,
) -> Result<(), AuditError> {
    let upto = query::max_id(db).await?;
    // Every event up to `upto` was committed before this wait began.
    durable.covering().await?;
    let mut chunk = String::with_capacity(CHUNK_BYTES + 4096);
    if format == Format::Csv {
        chunk.push_str(&csv_header());
    }
    let mut after = 0i64;
    loop {
        let page = query::scan(db, filter, after, upto, PAGE_ROWS).await?;
        let Some(last) = page.last() else { break };
        after = last.id;
        for rec in &page {
            match format {
                Format::Csv => csv_row(rec, &mut chunk),
                Format::Ndjson => {
                    chunk.push_str(&rec.to_json_line());
                    chunk.push('\n');
                }
            }
            if chunk.len() >= CHUNK_BYTES {
                let full = std::mem::replace(&mut chunk, String::with_capacity(CHUNK_BYTES + 4096));
                if tx.send(Ok(Bytes::from(full))).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
    if !chunk.is_empty() {
        let _ = tx.send(Ok(Bytes::from(chunk))).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An export reads only once what it would read is durable: a commit begun before it and
    /// not synced yet holds it back.
    #[tokio::test]
    async fn an_export_waits_until_what_it_reads_is_durable() {
        use http_body_util::BodyExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::connect(&crate::store::StoreConfig::Sqlite {
            path: dir.path().join("a.db"),
        })
        .await
        .expect("store");
        let mark = super::super::DurableMark::default();
        let commit = mark.begin();
        let mut body = stream_durable(
            store.db(),
            AuditFilter::default(),
            Format::Ndjson,
            mark.clone(),
        );
        let early = tokio::time::timeout(std::time::Duration::from_millis(300), body.frame()).await;
        assert!(
            early.is_err(),
            "the export read before the commit was durable"
        );
        mark.reached(commit);
        let ended = tokio::time::timeout(std::time::Duration::from_secs(10), body.collect())
            .await
            .expect("the export ends once durable");
        assert!(ended.is_ok());
    }

    fn cell(v: &str) -> String {
        let mut s = String::new();
        csv_cell(v, &mut s);
        s
    }

    #[test]
    fn csv_cells_are_quoted_and_defused() {
        assert_eq!(cell("plain"), "plain");
        assert_eq!(cell("a,b"), "\"a,b\"");
        assert_eq!(cell("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(cell("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        for bad in ["+1", "-2+3", "@SUM(A1)", "\tx", "\rx"] {
            let c = cell(bad);
            assert!(c.starts_with("\"'"), "{bad:?} → {c:?}");
        }
        assert_eq!(cell("a\nb"), "\"a\nb\"");
        // Split at `;` by a spreadsheet of such a locale, the second piece would be a formula.
        assert_eq!(cell("0;=cmd|' /C calc'!A0"), "\"0;=cmd|' /C calc'!A0\"");
    }

    #[test]
    fn filenames_are_dated_and_safe() {
        let ms = time::parse_rfc3339("2026-05-12T10:14:33Z").expect("ts");
        assert_eq!(
            filename(Some("acme"), ms, Format::Csv),
            "intentgate-audit-acme-20260512T101433Z.csv"
        );
        assert_eq!(
            content_disposition(Some("a\"b/c"), ms, Format::Ndjson),
            "attachment; filename=\"intentgate-audit-a_b_c-20260512T101433Z.ndjson\""
        );
        assert_eq!(Format::from_param(Some("json")).ok(), Some(Format::Ndjson));
        assert_eq!(Format::from_param(None).ok(), Some(Format::Csv));
        assert!(Format::from_param(Some("xml")).is_err());
    }
}
