//! Wiring for thread states: every housekeeping tick, the kernel's `THREADS` map and the thread
//! names from /proc go through `threads::ThreadAccounting` into `llm_thread_seconds_total`.

use std::collections::HashMap;

use probe_common::{MAX_THREADS, THREAD_BLOCKED};

use crate::{
    discover,
    kernel::Kernel,
    metrics::{label_value, threads::ThreadMetrics},
    threads::{snapshot, Sample, SharedThreads, ThreadAccounting},
};

pub struct ThreadSampler {
    acct: ThreadAccounting,
    metrics: ThreadMetrics,
    /// tid → (process name, thread name), read once per thread.
    names: HashMap<u32, (String, String)>,
    warned_full: bool,
    /// What `/api/v1/threads` serves.
    pub shared: SharedThreads,
}

impl ThreadSampler {
    pub fn new(metrics: ThreadMetrics) -> Self {
        Self {
            acct: ThreadAccounting::new(),
            metrics,
            names: HashMap::new(),
            warned_full: false,
            shared: SharedThreads::default(),
        }
    }

    pub fn tick(&mut self, kernel: &mut Kernel, traced: &[u32], now: u64) {
        let entries = kernel.thread_times();
        if entries.len() >= MAX_THREADS as usize && !self.warned_full {
            log::warn!(
                "thread-state map full ({MAX_THREADS} threads): threads seen from now on are not \
                 counted in llm_thread_seconds_total"
            );
            self.warned_full = true;
        }
        // Entries to drop after this read: exited threads, processes no longer traced (the rule
        // `ThreadAccounting::update` applies to its own state, by thread id).
        let gone: Vec<u64> = entries
            .iter()
            .filter(|(_, t)| t.state > THREAD_BLOCKED || !traced.contains(&t.tgid))
            .map(|(key, _)| *key)
            .collect();
        let samples: Vec<Sample> = entries
            .into_iter()
            .map(|(_, time)| {
                let tid = time.tid;
                let (process, thread) = self
                    .names
                    .entry(tid)
                    .or_insert_with(|| {
                        (
                            label_value(&discover::comm(time.tgid)),
                            label_value(&discover::thread_comm(time.tgid, tid)),
                        )
                    })
                    .clone();
                Sample {
                    tid,
                    time,
                    process,
                    thread,
                }
            })
            .collect();
        if let Ok(mut s) = self.shared.lock() {
            *s = snapshot(&samples, now);
        }
        let (deltas, forget) = self
            .acct
            .update(now, &samples, |tgid| traced.contains(&tgid));
        self.metrics.add(&deltas);
        self.metrics.tracked.set(self.acct.threads() as i64);
        for tid in &forget {
            self.names.remove(tid);
        }
        if !gone.is_empty() {
            kernel.forget_threads(&gone);
        }
        let present: std::collections::HashSet<u32> = samples.iter().map(|s| s.tid).collect();
        self.names.retain(|tid, _| present.contains(tid));
    }
}
