//! Connection slots of the endpoint: at most `MAX_CONNECTIONS` at once, and a full house gives a
//! new client the slot of the connection idle the longest. Idle connections (opened and silent,
//! or kept alive between scrapes) cannot starve `/metrics`: a flood of them evicts only itself,
//! while a connection in the middle of a request is never the victim. Clients that reconnect,
//! as Prometheus does at its next scrape, get a slot back the same way.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Instant,
};

use tokio::task::AbortHandle;

struct Entry {
    id: u64,
    /// When the connection was accepted or last finished a request.
    idle_since: Instant,
    busy: Arc<AtomicBool>,
    abort: Option<AbortHandle>,
}

/// The slot table shared by the accept loop and the connections.
pub struct Slots {
    max: usize,
    inner: Mutex<(u64, Vec<Entry>)>,
}

/// One connection's slot: tells the table when a request starts and ends; freed on drop.
pub struct Slot {
    slots: Arc<Slots>,
    id: u64,
    busy: Arc<AtomicBool>,
}

impl Slots {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max: max.max(1),
            inner: Mutex::new((0, Vec::new())),
        })
    }

    /// A slot for a new connection, evicting the longest-idle one when all are taken; `None`
    /// when every connection is in the middle of a request.
    pub fn acquire(self: &Arc<Self>) -> Option<Slot> {
        let mut guard = self.inner.lock().ok()?;
        let (next, entries) = &mut *guard;
        if entries.len() >= self.max {
            let victim = entries
                .iter()
                .enumerate()
                .filter(|(_, e)| !e.busy.load(Ordering::Acquire) && e.abort.is_some())
                .min_by_key(|(_, e)| e.idle_since)
                .map(|(i, _)| i)?;
            let e = entries.swap_remove(victim);
            if let Some(a) = e.abort {
                a.abort();
            }
        }
        *next += 1;
        let busy = Arc::new(AtomicBool::new(false));
        entries.push(Entry {
            id: *next,
            idle_since: Instant::now(),
            busy: busy.clone(),
            abort: None,
        });
        Some(Slot {
            slots: self.clone(),
            id: *next,
            busy,
        })
    }

    fn with_entry(&self, id: u64, f: impl FnOnce(&mut Entry)) {
        if let Ok(mut g) = self.inner.lock() {
            if let Some(e) = g.1.iter_mut().find(|e| e.id == id) {
                f(e);
            }
        }
    }

    /// Connections holding a slot now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.inner.lock().map_or(0, |g| g.1.len())
    }
}

impl Slot {
    /// The task serving this connection, so that eviction can stop it.
    pub fn set_task(&self, abort: AbortHandle) {
        self.slots.with_entry(self.id, |e| e.abort = Some(abort));
    }

    /// A request head arrived: not evictable until [`Self::request_done`].
    pub fn request_started(&self) {
        self.busy.store(true, Ordering::Release);
    }

    pub fn request_done(&self) {
        self.slots
            .with_entry(self.id, |e| e.idle_since = Instant::now());
        self.busy.store(false, Ordering::Release);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut g) = self.slots.inner.lock() {
            g.1.retain(|e| e.id != self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_house_evicts_the_longest_idle_and_never_a_busy_one() {
        let slots = Slots::new(2);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let task = || rt.spawn(std::future::pending::<()>()).abort_handle();
        let a = slots.acquire().expect("free");
        a.set_task(task());
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = slots.acquire().expect("free");
        b.set_task(task());
        a.request_started();
        // Full: b is idle, a is busy, so b goes.
        let c = slots.acquire().expect("b evicted");
        assert_eq!(slots.len(), 2);
        drop(b); // its entry is already gone
        assert_eq!(slots.len(), 2);
        c.set_task(task());
        c.request_started();
        assert!(slots.acquire().is_none(), "both busy");
        a.request_done();
        assert!(slots.acquire().is_some(), "a idle again");
        drop((a, c));
    }
}
