//! A connection whose peer stops taking what the gateway writes is closed, not held.
//!
//! hyper's only timer on a connection is the header read timeout, which runs only while a
//! request head is read. A client that sends requests and never reads their answers (pipelined
//! 404s, a large result, an event stream) leaves hyper waiting to write forever, and the
//! connection's slot is never given back: a thousand such clients take every slot. Wrapped in
//! [`Stalling`], a socket whose write (or flush) makes no progress for its bound fails with
//! `TimedOut`, and hyper ends the connection. A quiet connection is not a stalled one: the
//! bound runs only while a write waits.
//!
//! This module must never time out a read, nor a write that moves.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// An I/O whose writes fail once one waited `stall` without progress.
pub struct Stalling<T> {
    inner: T,
    stall: Duration,
    /// Armed when a write first waits; cleared when one moves.
    waiting: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> Stalling<T> {
    pub fn new(inner: T, stall: Duration) -> Self {
        Self {
            inner,
            stall,
            waiting: None,
        }
    }

    /// A write waits: `Pending` while within the bound, `TimedOut` past it.
    fn waits<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        let stall = self.stall;
        let timer = self
            .waiting
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the peer took nothing for {} s", stall.as_secs()),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn moved<R>(&mut self, done: Poll<io::Result<R>>, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        match done {
            Poll::Pending => self.waits(cx),
            ready => {
                self.waiting = None;
                ready
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Stalling<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Stalling<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let done = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.moved(done, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let done = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.moved(done, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let done = Pin::new(&mut self.inner).poll_flush(cx);
        self.moved(done, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let done = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.moved(done, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test]
    async fn a_peer_that_reads_nothing_is_given_up_on() {
        let (ours, mut theirs) = tokio::io::duplex(1024);
        let mut ours = Stalling::new(ours, Duration::from_millis(200));
        let chunk = [7u8; 512];
        let failed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Err(e) = ours.write_all(&chunk).await {
                    return e;
                }
            }
        })
        .await
        .expect("the write gave up");
        assert_eq!(failed.kind(), io::ErrorKind::TimedOut);
        // A peer that reads keeps it going, however long the whole takes.
        let (ours, mut reader) = tokio::io::duplex(1024);
        let mut ours = Stalling::new(ours, Duration::from_millis(200));
        let reading = tokio::spawn(async move {
            let mut buf = [0u8; 256];
            let mut total = 0;
            while total < 64 * 1024 {
                tokio::time::sleep(Duration::from_millis(5)).await;
                total += reader.read(&mut buf).await.expect("read");
            }
        });
        for _ in 0..128 {
            ours.write_all(&chunk)
                .await
                .expect("a slow reader is not a stalled one");
        }
        reading.await.expect("reader");
        drop(theirs.read(&mut [0u8; 1]).await);
    }
}
