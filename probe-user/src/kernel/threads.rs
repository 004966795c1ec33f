//! The `THREADS` map (probe-ebpf/src/threads.rs): scheduler time of each traced thread, read by
//! the agent every second and pruned of exited threads.

use aya::{maps::Array, Ebpf};
use btf_rs::{Btf, Type};
use probe_common::{ThreadTime, TASK_LAYOUT_LAST_ARRIVAL};

use super::Kernel;

/// Where the running kernel keeps the BTF that describes its own structs.
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Tell the scheduler programs where `task_struct.sched_info.last_arrival` (the run-queue clock
/// of a thread's last switch onto a CPU) is in this kernel, read from its BTF. With it, a
/// switch-in the programs did not see is dated from the thread's own record; without it (no
/// BTF, or a kernel without `CONFIG_SCHED_INFO`) such an interval stays unsplit, as before.
pub(super) fn set_task_layout(ebpf: &mut Ebpf) {
    let offset = match last_arrival_offset() {
        Ok(offset) => offset,
        Err(why) => {
            log::info!(
                "unseen switch-ins will not be dated ({why}): thread splits across one are left out"
            );
            return;
        }
    };
    let Some(map) = ebpf.map_mut("TASK_LAYOUT") else {
        return;
    };
    match Array::<_, u64>::try_from(map) {
        Ok(mut layout) => {
            if let Err(e) = layout.set(TASK_LAYOUT_LAST_ARRIVAL, offset, 0) {
                log::warn!("task layout not set: {e}");
            }
        }
        Err(e) => log::warn!("task layout map: {e}"),
    }
}

/// Byte offset of `task_struct.sched_info.last_arrival`.
fn last_arrival_offset() -> Result<u64, String> {
    let btf = Btf::from_file(VMLINUX_BTF).map_err(|e| format!("{VMLINUX_BTF}: {e}"))?;
    let (task, sched_info) = member_of(&btf, "task_struct", "sched_info")?;
    let Type::Struct(info) = sched_info else {
        return Err("task_struct.sched_info is not a struct".into());
    };
    let (at, _) = member(&btf, &info, "last_arrival")?;
    Ok(task + at)
}

/// (byte offset, type) of `field` in the struct named `name`.
fn member_of(btf: &Btf, name: &str, field: &str) -> Result<(u64, Type), String> {
    let types = btf
        .resolve_types_by_name(name)
        .map_err(|e| format!("{name}: {e}"))?;
    let s = types
        .into_iter()
        .find_map(|t| match t {
            Type::Struct(s) => Some(s),
            _ => None,
        })
        .ok_or_else(|| format!("no struct {name}"))?;
    member(btf, &s, field)
}

/// (byte offset, type with typedefs and qualifiers peeled) of `field` of `s`.
fn member(btf: &Btf, s: &btf_rs::Struct, field: &str) -> Result<(u64, Type), String> {
    for m in &s.members {
        if btf.resolve_name(m).is_ok_and(|n| n == field) {
            if m.bitfield_size().is_some_and(|b| b != 0) || m.bit_offset() % 8 != 0 {
                return Err(format!("{field} is a bit field"));
            }
            let mut t = btf
                .resolve_chained_type(m)
                .map_err(|e| format!("{field}: {e}"))?;
            while let Type::Typedef(_) | Type::Volatile(_) | Type::Const(_) = t {
                let inner = t.as_btf_type().ok_or("no inner type")?;
                t = btf
                    .resolve_chained_type(inner)
                    .map_err(|e| format!("{field}: {e}"))?;
            }
            return Ok((u64::from(m.bit_offset() / 8), t));
        }
    }
    Err(format!("no member {field} (CONFIG_SCHED_INFO off?)"))
}

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

#[cfg(test)]
mod tests {
    /// `field`'s bit offset in the struct `name` of bpftool's raw dump of the kernel's BTF.
    fn bpftool_bits(dump: &str, name: &str, field: &str) -> Option<u64> {
        let head = format!("STRUCT '{name}' ");
        let mut lines = dump
            .lines()
            .skip_while(|l| !(l.starts_with('[') && l.contains(&head)));
        lines.next()?;
        lines
            .take_while(|l| l.starts_with('\t'))
            .find(|l| l.trim_start().starts_with(&format!("'{field}' ")))?
            .split_whitespace()
            .find_map(|w| w.strip_prefix("bits_offset="))?
            .parse()
            .ok()
    }

    /// The running kernel (this VM's and CI's have BTF and `CONFIG_SCHED_INFO`) says where
    /// `last_arrival` is; bpftool's dump of the same BTF is the witness where it is installed.
    #[test]
    fn last_arrival_is_found_in_the_running_kernel() {
        if !std::path::Path::new(super::VMLINUX_BTF).exists() {
            eprintln!("skipped: no {}", super::VMLINUX_BTF);
            return;
        }
        let off = super::last_arrival_offset().expect("task_struct.sched_info.last_arrival");
        assert!(off > 0 && off.is_multiple_of(8), "offset {off}");
        let Ok(out) = std::process::Command::new("bpftool")
            .args(["btf", "dump", "file", super::VMLINUX_BTF, "format", "raw"])
            .output()
        else {
            eprintln!("no bpftool: offset {off} not cross-checked");
            return;
        };
        let dump = String::from_utf8_lossy(&out.stdout);
        let task = bpftool_bits(&dump, "task_struct", "sched_info").expect("task_struct");
        let info = bpftool_bits(&dump, "sched_info", "last_arrival").expect("sched_info");
        assert_eq!(off, (task + info) / 8, "bpftool: {task} + {info} bits");
    }
}
