//! Where the traced processes' threads spend their time — on a CPU, runnable but waiting for one
//! (run-queue delay), or blocked — per process and thread role, from the kernel's per-thread
//! totals (`probe_common::ThreadTime`, kept by probe-ebpf/src/threads.rs). Pure: snapshots in,
//! per-role deltas out; the agent reads the map and the thread names.
//!
//! Labels are bounded: a role is a thread name (`/proc/PID/task/TID/comm`, at most 15 bytes) with
//! a pool's trailing number cut (`ZMQbg/IO/0` → `ZMQbg/IO/`), at most `MAX_ROLES_PER_PROCESS` per process
//! name and `MAX_KEYS` (process, role) pairs in all; beyond them the time goes to role `other`
//! (and process `other`), never lost.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
};

use probe_common::{ThreadTime, THREAD_BLOCKED, THREAD_ON_CPU, THREAD_RUNNABLE};
use serde::Serialize;

/// The `state` label values, in `ThreadTime` order.
pub const STATES: [&str; 3] = ["on_cpu", "runnable", "blocked"];
/// Distinct roles kept per process name.
pub const MAX_ROLES_PER_PROCESS: usize = 16;
/// Distinct (process, role) pairs kept in all.
pub const MAX_KEYS: usize = 256;
/// The role (and process) that takes what the bounds turn away.
pub const OTHER: &str = "other";

/// A (process, role) pair: the labels time is exported under.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoleKey {
    pub process: String,
    pub role: String,
}

/// One thread as read from the kernel's map, with its names (already label-safe).
#[derive(Clone, Debug)]
pub struct Sample {
    pub tid: u32,
    pub time: ThreadTime,
    /// The process's name (`/proc/PID/comm`).
    pub process: String,
    /// The thread's name (`/proc/PID/task/TID/comm`).
    pub thread: String,
}

/// One traced thread's totals at a moment (`/api/v1/threads`; `llm-probe trace` turns two of
/// them into a timeline).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ThreadView {
    pub pid: u32,
    pub tid: u32,
    pub process: String,
    pub thread: String,
    pub on_cpu_ns: u64,
    pub runnable_ns: u64,
    pub blocked_ns: u64,
}

/// Every traced thread's totals at `at_ns` (`CLOCK_MONOTONIC`), refreshed every second.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ThreadsSnapshot {
    pub at_ns: u64,
    pub threads: Vec<ThreadView>,
}

pub type SharedThreads = Arc<Mutex<ThreadsSnapshot>>;

/// The snapshot of `samples` at `now`, open intervals included.
pub fn snapshot(samples: &[Sample], now: u64) -> ThreadsSnapshot {
    let threads = samples
        .iter()
        .map(|s| {
            let [on, run, blk] = totals_at(&s.time, now);
            ThreadView {
                pid: s.time.tgid,
                tid: s.tid,
                process: s.process.clone(),
                thread: s.thread.clone(),
                on_cpu_ns: on,
                runnable_ns: run,
                blocked_ns: blk,
            }
        })
        .collect();
    ThreadsSnapshot {
        at_ns: now,
        threads,
    }
}

/// A thread's name without the number a worker pool puts after a separator (`ZMQbg/IO/0`,
/// `pt_tp_12`, `worker-3`); a name that ends in digits otherwise (`python3`) is kept.
pub fn role_of(thread: &str) -> String {
    let cut = thread.trim_end_matches(|c: char| c.is_ascii_digit());
    if cut.len() < thread.len() && cut.ends_with(|c: char| !c.is_ascii_alphanumeric()) {
        cut.to_owned()
    } else {
        thread.to_owned()
    }
}

/// On-CPU, runnable and blocked nanoseconds of `t` at `now`, the current state's open interval
/// included.
pub fn totals_at(t: &ThreadTime, now: u64) -> [u64; 3] {
    let mut v = [t.on_cpu_ns, t.runnable_ns, t.blocked_ns];
    let open = now.saturating_sub(t.since_ns);
    match t.state {
        THREAD_ON_CPU => v[0] += open,
        THREAD_RUNNABLE => v[1] += open,
        THREAD_BLOCKED => v[2] += open,
        _ => {}
    }
    v
}

/// Per-thread last totals and per-key running totals.
#[derive(Debug, Default)]
pub struct ThreadAccounting {
    /// tid → (its key, its totals at the last snapshot).
    last: HashMap<u32, (RoleKey, [u64; 3])>,
    /// Per key: nanoseconds in each state since the agent started.
    totals: HashMap<RoleKey, [u64; 3]>,
    roles: HashMap<String, HashSet<String>>,
}

impl ThreadAccounting {
    pub fn new() -> Self {
        Self::default()
    }

    fn key_for(&mut self, process: &str, thread: &str) -> RoleKey {
        let role = role_of(thread);
        let known = self.roles.entry(process.to_owned()).or_default();
        let role = if known.contains(&role) || known.len() < MAX_ROLES_PER_PROCESS {
            known.insert(role.clone());
            role
        } else {
            OTHER.to_owned()
        };
        let key = RoleKey {
            process: process.to_owned(),
            role,
        };
        if self.totals.contains_key(&key) || self.totals.len() < MAX_KEYS {
            key
        } else {
            RoleKey {
                process: OTHER.to_owned(),
                role: OTHER.to_owned(),
            }
        }
    }

    /// One snapshot of the kernel's map at `now`. Returns the nanoseconds per key added since the
    /// last snapshot, and the threads the kernel map can drop: exited ones (after this last
    /// read) and those of processes no longer traced (`traced` says which are).
    pub fn update(
        &mut self,
        now: u64,
        samples: &[Sample],
        traced: impl Fn(u32) -> bool,
    ) -> (Vec<(RoleKey, [u64; 3])>, Vec<u32>) {
        let mut added: HashMap<RoleKey, [u64; 3]> = HashMap::new();
        let mut forget = Vec::new();
        let mut seen = HashSet::with_capacity(samples.len());
        for s in samples {
            seen.insert(s.tid);
            let now_totals = totals_at(&s.time, now);
            let (key, before) = match self.last.get(&s.tid) {
                Some((k, v)) => (k.clone(), *v),
                None => (self.key_for(&s.process, &s.thread), [0; 3]),
            };
            let d = added.entry(key.clone()).or_default();
            let mut after = before;
            for i in 0..3 {
                // Reads of a live entry are not atomic: never count backwards.
                let delta = now_totals[i].saturating_sub(before[i]);
                d[i] += delta;
                after[i] = before[i] + delta;
            }
            if s.time.state > THREAD_BLOCKED || !traced(s.time.tgid) {
                forget.push(s.tid);
                self.last.remove(&s.tid);
            } else {
                self.last.insert(s.tid, (key, after));
            }
        }
        // Entries gone from the map (a reused id overwrote it, or it was dropped): forget them.
        self.last.retain(|tid, _| seen.contains(tid));
        let mut out: Vec<_> = added.into_iter().filter(|(_, d)| *d != [0; 3]).collect();
        out.sort();
        for (k, d) in &out {
            let t = self.totals.entry(k.clone()).or_default();
            for i in 0..3 {
                t[i] += d[i];
            }
        }
        (out, forget)
    }

    /// Nanoseconds per key and state since the start, sorted by key.
    pub fn totals(&self) -> Vec<(RoleKey, [u64; 3])> {
        let mut v: Vec<_> = self.totals.iter().map(|(k, t)| (k.clone(), *t)).collect();
        v.sort();
        v
    }

    /// Threads followed now.
    pub fn threads(&self) -> usize {
        self.last.len()
    }
}

#[cfg(test)]
mod tests;
