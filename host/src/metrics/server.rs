//! The listener's side: connections open now, sessions issued, scrapes answered.
//!
//! Sessions are stateless (a signed id the gateway does not store), so "active sessions" cannot
//! be counted; `intentgate_sessions_issued_total` counts the ones handed out. This module must
//! never label with a remote address or a session id.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use super::exposition::{Exposition, Kind};

#[derive(Debug, Default)]
pub struct Server {
    open: Arc<AtomicI64>,
    accepted: AtomicU64,
    sessions: AtomicU64,
}

/// Counts a connection as open while held.
#[derive(Debug)]
pub struct OpenConnection(Arc<AtomicI64>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Server {
    /// A connection was accepted (within the cap); it counts as open until the guard drops.
    pub fn connection(&self) -> OpenConnection {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::Relaxed);
        OpenConnection(Arc::clone(&self.open))
    }

    /// A handshake-era session id was issued.
    pub fn session_issued(&self) {
        self.sessions.fetch_add(1, Ordering::Relaxed);
    }

    pub fn write(&self, e: &mut Exposition, max_connections: usize) {
        e.single(
            "intentgate_connections_open",
            Kind::Gauge,
            "Client connections open on the main listener.",
            self.open.load(Ordering::Relaxed).max(0) as u64,
        );
        e.single(
            "intentgate_connections_max",
            Kind::Gauge,
            "Most connections served at once (INTENTGATE_MAX_CONNECTIONS).",
            max_connections,
        );
        e.single(
            "intentgate_connections_accepted_total",
            Kind::Counter,
            "Client connections accepted on the main listener (within the cap).",
            self.accepted.load(Ordering::Relaxed),
        );
        e.single(
            "intentgate_sessions_issued_total",
            Kind::Counter,
            "MCP sessions issued by initialize (sessions are stateless: active ones are not counted).",
            self.sessions.load(Ordering::Relaxed),
        );
    }
}
