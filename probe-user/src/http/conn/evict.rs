//! Which connection states the tracker keeps when `max_conns` is reached: second-chance
//! (CLOCK) eviction over the tracker's queue (see `ConnTracker::lru`).

use std::collections::VecDeque;

use rustc_hash::FxHashMap;

use super::{Conn, Mode};
use crate::http::{ConnId, Observer};

/// Finds or creates a connection's state and marks it most recently used (one hash lookup on the
/// hot path); `accepted` says a state created now follows an accept. `None` for connections no
/// longer parsed. A free function over the tracker's fields so that the caller can borrow
/// `next_seq` next to the returned state.
#[expect(
    clippy::too_many_arguments,
    reason = "the tracker's fields, borrowed apart from its sequence counter"
)]
pub(super) fn touch<'a>(
    conns: &'a mut FxHashMap<ConnId, Conn>,
    lru: &mut VecDeque<(u64, ConnId)>,
    tick: &mut u64,
    used: &mut usize,
    max_conns: usize,
    id: ConnId,
    ts: u64,
    accepted: bool,
    obs: &mut impl Observer,
) -> Option<&'a mut Conn> {
    *tick += 1;
    if conns.len() >= max_conns && !conns.contains_key(&id) {
        while conns.len() >= max_conns {
            let Some((stamp, victim)) = lru.pop_front() else {
                break;
            };
            let Some(c) = conns.get_mut(&victim) else {
                continue; // closed since it was queued
            };
            if c.queued != stamp {
                continue; // an entry of an earlier connection on the same fd
            }
            if c.tick > stamp {
                c.queued = c.tick;
                lru.push_back((c.tick, victim));
                continue;
            }
            if let Some(c) = conns.remove(&victim) {
                *used = used.saturating_sub(c.accounted);
                c.reset_all(victim, ts, obs);
            }
        }
    }
    if lru.len() > 2 * conns.len() + 1024 {
        lru.retain(|(stamp, id)| conns.get(id).is_some_and(|c| c.queued == *stamp));
    }
    let now = *tick;
    let c = conns.entry(id).or_insert_with(|| {
        lru.push_back((now, id));
        let mut c = Conn::new(accepted);
        c.queued = now;
        c
    });
    c.tick = now;
    (c.mode == Mode::Active).then_some(c)
}
