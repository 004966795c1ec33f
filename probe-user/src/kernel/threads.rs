//! The `THREADS` map (probe-ebpf/src/threads.rs): scheduler time of each traced thread, read by
//! the agent every second and pruned of exited threads.

use probe_common::ThreadTime;

use super::Kernel;

impl Kernel {
    /// Every thread entry now, by its key (the task's address; the thread id is in the value).
    /// One lookup per entry; a few hundred for a vLLM server.
    pub fn thread_times(&self) -> Vec<(u64, ThreadTime)> {
        self.threads
            .as_ref()
            .map(|m| m.iter().filter_map(Result::ok).collect())
            .unwrap_or_default()
    }

    /// Drop the entries of `keys` (exited threads, or of processes no longer traced).
    pub fn forget_threads(&mut self, keys: &[u64]) {
        if let Some(m) = self.threads.as_mut() {
            for key in keys {
                let _ = m.remove(key);
            }
        }
    }
}
