//! Runs of the attached programs that the kernel skipped: a program is not run when it would nest
//! in a run already in progress on that CPU (for classic tracepoints and uprobes: any such
//! program; for raw tracepoints: itself). The kernel counts them per program and shows the count
//! in the program's fdinfo (`recursion_misses`, Linux 5.12+); a skipped run is a lost record or a
//! missed state change, so it is exported (`llm_probe_program_misses_total{program}`), never
//! silent.

use std::{
    io::Read as _,
    os::fd::{AsFd as _, AsRawFd as _},
};

use super::Kernel;

/// fdinfo of a BPF program is a dozen short lines.
const MAX_FDINFO_BYTES: u64 = 4096;

/// The `recursion_misses` value in fdinfo `text`, if present.
pub fn parse_misses(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("recursion_misses:"))
        .and_then(|v| v.trim().parse().ok())
}

impl Kernel {
    /// Skipped runs of every attached program (those whose count the kernel shows).
    pub fn program_misses(&self) -> Vec<(&'static str, u64)> {
        self.attached
            .iter()
            .filter(|a| a.ok)
            .filter_map(|a| {
                let fd = self.ebpf.program(a.program)?.fd().ok()?.as_fd().as_raw_fd();
                let mut text = String::new();
                std::fs::File::open(format!("/proc/self/fdinfo/{fd}"))
                    .and_then(|f| f.take(MAX_FDINFO_BYTES).read_to_string(&mut text))
                    .ok()?;
                Some((a.program, parse_misses(&text)?))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn misses_are_read_from_fdinfo() {
        let text = "pos:\t0\nflags:\t02000002\nprog_type:\t5\nrun_cnt:\t0\nrecursion_misses:\t17\n";
        assert_eq!(parse_misses(text), Some(17));
        assert_eq!(parse_misses("prog_type:\t5\n"), None);
        assert_eq!(parse_misses("recursion_misses:\tx\n"), None);
    }
}
