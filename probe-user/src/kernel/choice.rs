//! What the operator chose to load: the socket capture path (`--capture`) and, for benchmarks,
//! a floor of the `sock:` path (`--bench-floor`).

/// Which socket capture path to use (`--capture`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum CaptureChoice {
    /// The `sock:` path where it loads, else the syscall path.
    #[default]
    Auto,
    /// The `sock:` path or nothing.
    Sock,
    /// The syscall path.
    Syscalls,
}

/// A benchmark floor of the `sock:` path (`--bench-floor`, `probe_common::floor`): what capture
/// costs before it does any work. Nothing is measured under one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchFloor {
    /// Normal capture.
    #[default]
    Off,
    /// The programs are attached and return at once.
    Hooks,
    /// As `hooks`, plus one bare record per send of a traced process.
    Records,
}

impl BenchFloor {
    pub(super) fn value(self) -> u32 {
        match self {
            Self::Off => probe_common::floor::OFF,
            Self::Hooks => probe_common::floor::HOOKS,
            Self::Records => probe_common::floor::RECORDS,
        }
    }
}
