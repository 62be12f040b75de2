//! Reading a page of rows within a byte budget.
//!
//! Pages of the admin API are bounded by rows, but a row can be as large as a request (audit
//! events and approvals with raw argument values on): a thousand of them would be a gigabyte
//! held at once. A page is read row by row from the database's stream and ends once it holds
//! [`MAX_PAGE_BYTES`]; the caller then gives a cursor to go on from.
//!
//! This module must never end a page before its first row (a single large row still pages).

use futures_core::stream::BoxStream;

/// Most bytes of rows one page holds in memory (about: each row is weighed by its caller).
pub const MAX_PAGE_BYTES: usize = 8 << 20;

/// Reads `rows`, each turned by `weigh` into a value and its size, until they end or hold more
/// than [`MAX_PAGE_BYTES`] (the row that crossed it is dropped, unless it is the first); says
/// whether the page ended early. The rest of the stream is never read.
pub(crate) async fn read_bounded<R, T, E>(
    mut rows: BoxStream<'_, Result<R, sqlx::Error>>,
    mut weigh: impl FnMut(R) -> Result<(T, usize), E>,
) -> Result<(Vec<T>, bool), E>
where
    E: From<sqlx::Error>,
{
    let mut out = Vec::new();
    let mut bytes = 0usize;
    while let Some(row) = std::future::poll_fn(|cx| rows.as_mut().poll_next(cx)).await {
        let (value, size) = weigh(row?)?;
        bytes = bytes.saturating_add(size);
        if bytes > MAX_PAGE_BYTES && !out.is_empty() {
            return Ok((out, true));
        }
        out.push(value);
    }
    Ok((out, false))
}
