//! TLS: which connection a piece of OpenSSL plaintext belongs to.
//!
//! The kernel reports two things for a TLS connection: its socket I/O (ciphertext, keyed by the
//! connection) and the plaintext of `SSL_read`/`SSL_write` (keyed by the `SSL *` and the calling
//! thread, with no connection). This joins them:
//!
//! - A connection whose first bytes read are a TLS record (`looks_like_tls`) is a TLS connection
//!   from then on: its socket bytes never reach the HTTP parser. When its process's OpenSSL calls
//!   are not probed, that is said once (`ParseErrorKind::TlsUnreadable`) and it is untracked.
//! - An `SSL *` is bound to a connection at its first plaintext read: the connection whose
//!   ciphertext the same thread read last. OpenSSL decrypts what the socket delivered in the same
//!   thread — inside `SSL_read` with a socket BIO; right after the socket read with a memory BIO
//!   (Python's `SSLObject` under asyncio and uvloop, Node's TLS sockets), because the read
//!   callback feeds the BIO and drains it before the event loop runs anything else. A server
//!   reads a request before it writes, so every plaintext write finds its binding.
//! - Ingress plaintext is dated by the arrival of the last ciphertext read before it (the
//!   clear-text rule: when the request bytes reached the socket — the handshake's bytes, read
//!   earlier, are not the request's); egress plaintext by its `SSL_write` entry. A request whose
//!   TLS record spans several socket reads is dated by the last of them.
//!
//! Plaintext that finds no connection (a write on an `SSL *` never read from; a read whose thread
//! read no TLS ciphertext) is dropped and counted by direction, never guessed.
//! Bounded: one entry per TLS connection (at most `MAX_TLS_CONNS`), one binding per connection,
//! one hint per thread (at most `MAX_THREAD_HINTS`, cleared when full).

use rustc_hash::FxHashMap;

use super::ConnId;

/// TLS connections with state at once. Past it a new one is not joined (its plaintext counts as
/// unmatched); closes and process exits free entries.
pub const MAX_TLS_CONNS: usize = 65536;
/// Threads remembered with the connection they read last; the map is cleared when it fills.
pub const MAX_THREAD_HINTS: usize = 16384;

/// Where a socket record goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Clear text (or not yet known): to the HTTP parser.
    Plain,
    /// Ciphertext of a TLS connection: only its end and errors matter.
    Cipher,
    /// The first TLS bytes of a connection whose plaintext cannot be read: report and untrack.
    Unreadable,
}

#[derive(Debug, Default)]
struct TlsConn {
    /// The `SSL *` bound to it.
    ssl: Option<u64>,
    /// Arrival of its last ciphertext read (not the oldest: the handshake's reads come before a
    /// request's and are consumed by no `SSL_read`): the first and the last of the read's parts
    /// (see `ReadArrival`).
    arrival: Option<(u64, u64)>,
    /// A plaintext read was dated by `arrival`'s first part: later ones, by its last.
    dated: bool,
    /// Its plaintext is not probed: records are dropped until it closes.
    unreadable: bool,
}

/// Counts of what the join did, for `llm_probe_tls_*` metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TlsCounts {
    /// TLS connections seen (readable or not).
    pub connections: u64,
    /// Plaintext records tied to a connection.
    pub matched: u64,
    pub unmatched_reads: u64,
    pub unmatched_writes: u64,
}

#[derive(Debug, Default)]
pub struct TlsJoin {
    conns: FxHashMap<ConnId, TlsConn>,
    /// (tgid, `SSL *`) → connection.
    bound: FxHashMap<(u32, u64), ConnId>,
    /// Thread id → the TLS connection whose ciphertext it read last.
    last_read: FxHashMap<u32, ConnId>,
    pub counts: TlsCounts,
}

/// A TLS record header: content type change-cipher-spec, alert, handshake or application data,
/// then version 3.x (SSL 3.0 .. TLS 1.3 all write 0x03 0x00..0x04). No HTTP/1.x request starts
/// with these bytes, nor does an HTTP/2 preface.
pub fn looks_like_tls(bytes: &[u8]) -> bool {
    matches!(bytes, [0x14..=0x17, 0x03, 0x00..=0x04, ..])
}

impl TlsJoin {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_tls(&self, conn: ConnId) -> bool {
        self.conns.contains_key(&conn)
    }

    /// A socket record of `conn` by thread `tid`, dated `ts_ns` (ingress: the bytes' arrival);
    /// `read`: the first bytes of a read that returned some (`None` for writes, errors, EOF).
    /// `readable`: the process's OpenSSL calls are probed.
    pub fn on_socket(
        &mut self,
        conn: ConnId,
        tid: u32,
        read: Option<&[u8]>,
        ts_ns: u64,
        readable: bool,
    ) -> Route {
        if let Some(c) = self.conns.get_mut(&conn) {
            if read.is_some() && !c.unreadable {
                c.arrival = Some((ts_ns, ts_ns));
                c.dated = false;
                Self::hint(&mut self.last_read, tid, conn);
            }
            return Route::Cipher;
        }
        if !read.is_some_and(looks_like_tls) || self.conns.len() >= MAX_TLS_CONNS {
            return Route::Plain;
        }
        self.counts.connections += 1;
        let c = TlsConn {
            ssl: None,
            arrival: Some((ts_ns, ts_ns)),
            dated: false,
            unreadable: !readable,
        };
        self.conns.insert(conn, c);
        if !readable {
            return Route::Unreadable;
        }
        Self::hint(&mut self.last_read, tid, conn);
        Route::Cipher
    }

    /// The last arrival of `conn`'s ciphertext read just reported to `on_socket`, when its bytes
    /// came in several (the first is that call's `ts_ns`).
    pub fn last_arrival(&mut self, conn: ConnId, last_ns: u64) {
        if let Some((first, last)) = self.conns.get_mut(&conn).and_then(|c| c.arrival.as_mut()) {
            *last = last_ns.max(*first);
        }
    }

    fn hint(map: &mut FxHashMap<u32, ConnId>, tid: u32, conn: ConnId) {
        if map.len() >= MAX_THREAD_HINTS && !map.contains_key(&tid) {
            map.clear();
        }
        map.insert(tid, conn);
    }

    /// Plaintext of `ssl` in process `tgid`, by thread `tid`. Returns its connection and, for a
    /// read, the arrival of the ciphertext it came in (when known: the first part of the last
    /// ciphertext read for the first plaintext read after it, the last part for later ones, as
    /// their records come later in the read); `None` (counted) when it belongs to no connection
    /// we can name.
    pub fn on_plaintext(
        &mut self,
        tgid: u32,
        tid: u32,
        ssl: u64,
        egress: bool,
    ) -> Option<(ConnId, Option<u64>)> {
        let key = (tgid, ssl);
        let bound = self
            .bound
            .get(&key)
            .copied()
            .filter(|c| self.conns.get(c).is_some_and(|t| t.ssl == Some(ssl)));
        let conn = match bound {
            Some(c) => c,
            None if egress => {
                self.counts.unmatched_writes += 1;
                return None;
            }
            None => {
                let Some(c) = self.last_read.get(&tid).copied().filter(|c| c.tgid == tgid) else {
                    self.counts.unmatched_reads += 1;
                    return None;
                };
                let Some(t) = self.conns.get_mut(&c).filter(|t| !t.unreadable) else {
                    self.counts.unmatched_reads += 1;
                    return None;
                };
                // An `SSL *` freed and reused for a new connection replaces the old binding.
                if let Some(old) = t.ssl.replace(ssl) {
                    self.bound.remove(&(tgid, old));
                }
                self.bound.insert(key, c);
                c
            }
        };
        self.counts.matched += 1;
        let arrival = if egress {
            None
        } else {
            self.conns.get_mut(&conn).and_then(|t| {
                let (first, last) = t.arrival?;
                Some(if std::mem::replace(&mut t.dated, true) {
                    last
                } else {
                    first
                })
            })
        };
        Some((conn, arrival))
    }

    #[cfg(test)]
    fn hint_for_test(&mut self, tid: u32, conn: ConnId) {
        Self::hint(&mut self.last_read, tid, conn);
    }

    /// The connection ended (closed, or its fd now names a new one).
    pub fn forget(&mut self, conn: ConnId) {
        if let Some(c) = self.conns.remove(&conn) {
            if let Some(ssl) = c.ssl {
                self.bound.remove(&(conn.tgid, ssl));
            }
        }
    }

    /// The process exited.
    pub fn forget_process(&mut self, tgid: u32) {
        self.conns.retain(|c, _| c.tgid != tgid);
        self.bound.retain(|(t, _), _| *t != tgid);
        self.last_read.retain(|_, c| c.tgid != tgid);
    }
}

#[cfg(test)]
mod tests;
