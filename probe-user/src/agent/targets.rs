//! The traced-process set and its single owner. The kernel's `TARGETS` map (its tgid filter) is a
//! mirror the agent writes through `Kernel`; `/health` and the samplers get snapshots from here:
//! `publish` copies the set into the health view and into a `watch` channel of live pids.

use std::collections::BTreeMap;

use tokio::sync::watch;

use crate::{
    discover,
    health::{SharedHealth, TargetView},
};

/// Exited targets kept for `/health` (the newest ones): a server that forks a worker per request
/// must not grow the verdict with every fork.
pub const MAX_EXITED_KEPT: usize = 16;

/// One traced process as the agent knows it.
#[derive(Clone, Debug)]
struct Target {
    comm: String,
    /// How it was found: `pid`, `port` or `fork`.
    via: &'static str,
    alive: bool,
    /// Its CUDA libraries were resolved and the uprobes attached for it.
    cuda: bool,
    /// Its OpenSSL files were looked for and probed (`None`: not yet); `Some(true)` when one is
    /// probed, so that its TLS connections can be read.
    ssl: Option<bool>,
    /// Order of exit, for pruning the oldest exited targets.
    exited_at: u64,
}

pub struct Targets {
    map: BTreeMap<u32, Target>,
    health: SharedHealth,
    live_tx: watch::Sender<Vec<u32>>,
    dirty: bool,
    exits: u64,
    /// (descendant, root) pairs found at attach, for the ingest's process trees (see
    /// `take_tree_joins`).
    tree_joins: Vec<(u32, u32)>,
}

impl Targets {
    pub fn new(health: SharedHealth) -> Self {
        Self {
            map: BTreeMap::new(),
            health,
            live_tx: watch::Sender::new(Vec::new()),
            dirty: false,
            exits: 0,
            tree_joins: Vec::new(),
        }
    }

    /// A receiver of the live pids, updated at every `publish` that changed them.
    pub fn subscribe(&self) -> watch::Receiver<Vec<u32>> {
        self.live_tx.subscribe()
    }

    /// Start tracking `pid` (found `via` pid, port or fork). Returns false when already alive.
    pub fn add(&mut self, pid: u32, via: &'static str) -> bool {
        if self.map.get(&pid).is_some_and(|t| t.alive) {
            return false;
        }
        self.map.insert(
            pid,
            Target {
                comm: discover::comm(pid),
                via,
                alive: true,
                cuda: false,
                ssl: None,
                exited_at: 0,
            },
        );
        self.dirty = true;
        true
    }

    /// `pid` was found under `root` (a process the user named, or one listening on the port):
    /// the engine that computes for `root`'s requests may be `pid`.
    pub fn in_tree(&mut self, pid: u32, root: u32) {
        if pid != root {
            self.tree_joins.push((pid, root));
        }
    }

    /// The tree memberships found since the last call (forks are reported by the kernel).
    pub fn take_tree_joins(&mut self) -> Vec<(u32, u32)> {
        std::mem::take(&mut self.tree_joins)
    }

    /// `pid` exited (or was found gone). Returns whether it was alive until now.
    pub fn exited(&mut self, pid: u32) -> bool {
        match self.map.get_mut(&pid) {
            Some(t) if t.alive => {
                t.alive = false;
                self.exits += 1;
                t.exited_at = self.exits;
                self.dirty = true;
                true
            }
            _ => false,
        }
    }

    fn pids_where(&self, f: impl Fn(&Target) -> bool) -> Vec<u32> {
        self.map
            .iter()
            .filter(|(_, t)| f(t))
            .map(|(&pid, _)| pid)
            .collect()
    }

    pub fn alive(&self) -> Vec<u32> {
        self.pids_where(|t| t.alive)
    }

    /// Live targets whose CUDA probes are not attached yet.
    pub fn without_cuda(&self) -> Vec<u32> {
        self.pids_where(|t| t.alive && !t.cuda)
    }

    /// Dead targets whose CUDA probes are still attached (to detach).
    pub fn dead_with_cuda(&self) -> Vec<u32> {
        self.pids_where(|t| !t.alive && t.cuda)
    }

    pub fn set_cuda(&mut self, pid: u32, attached: bool) {
        if let Some(t) = self.map.get_mut(&pid) {
            t.cuda = attached;
            // A detached exited target may be pruned now.
            self.dirty |= !attached && !t.alive;
        }
    }

    /// Live targets whose OpenSSL files were not looked for yet.
    pub fn without_ssl(&self) -> Vec<u32> {
        self.pids_where(|t| t.alive && t.ssl.is_none())
    }

    /// Dead targets whose OpenSSL probes may still be attached (to detach).
    pub fn dead_with_ssl(&self) -> Vec<u32> {
        self.pids_where(|t| !t.alive && t.ssl.is_some())
    }

    /// `looked`: its OpenSSL files were looked for and attached; `covered`: at least one is
    /// probed now.
    pub fn set_ssl(&mut self, pid: u32, looked: bool, covered: bool) {
        if let Some(t) = self.map.get_mut(&pid) {
            t.ssl = looked.then_some(covered);
            self.dirty |= !looked && !t.alive;
        }
    }

    /// Whether `pid`'s TLS plaintext is probed (its OpenSSL calls are seen).
    pub fn tls_readable(&self, pid: u32) -> bool {
        self.map.get(&pid).is_some_and(|t| t.ssl == Some(true))
    }

    /// Forget the oldest exited targets past `MAX_EXITED_KEPT` (once their CUDA links are gone).
    fn prune(&mut self) {
        let mut exited: Vec<(u64, u32)> = self
            .map
            .iter()
            .filter(|(_, t)| !t.alive && !t.cuda && t.ssl.is_none())
            .map(|(&pid, t)| (t.exited_at, pid))
            .collect();
        if exited.len() <= MAX_EXITED_KEPT {
            return;
        }
        exited.sort_unstable();
        for &(_, pid) in &exited[..exited.len() - MAX_EXITED_KEPT] {
            self.map.remove(&pid);
        }
    }

    /// Copy the set into the health view and the live-pid channel, if it changed.
    pub fn publish(&mut self) {
        if !std::mem::take(&mut self.dirty) {
            return;
        }
        self.prune();
        let views = self
            .map
            .iter()
            .map(|(&pid, t)| {
                (
                    pid,
                    TargetView {
                        pid,
                        comm: t.comm.clone(),
                        alive: t.alive,
                        via: t.via,
                    },
                )
            })
            .collect();
        if let Ok(mut h) = self.health.lock() {
            h.targets = views;
        }
        let live = self.alive();
        self.live_tx.send_if_modified(|v| {
            let changed = *v != live;
            *v = live;
            changed
        });
    }
}
