//! Where the running kernel keeps the struct fields the programs read (`TASK_LAYOUT`,
//! `TCP_LAYOUT`), found in its BTF when the programs are loaded. A field not found stays 0 and
//! the programs go without it: what needs it is left out, as logged.

use aya::{maps::Array, Ebpf};
use btf_rs::{Btf, Type};
use probe_common::{
    TASK_LAYOUT_GROUP_LEADER, TASK_LAYOUT_LAST_ARRIVAL, TCP_LAYOUT_COPIED_SEQ, TCP_LAYOUT_RCV_NXT,
};

/// Where the running kernel keeps the BTF that describes its own structs.
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Reads the kernel's BTF once and sets every layout map.
pub(super) fn set_layouts(ebpf: &mut Ebpf) {
    let btf = Btf::from_file(VMLINUX_BTF).map_err(|e| format!("{VMLINUX_BTF}: {e}"));
    let btf = btf.as_ref().map_err(Clone::clone);
    // `task_struct.sched_info.last_arrival` (the run-queue clock of a thread's last switch onto a
    // CPU): with it, a switch-in the programs did not see is dated from the thread's own record;
    // without it (no BTF, or a kernel without `CONFIG_SCHED_INFO`) such an interval stays
    // unsplit.
    match btf.clone().and_then(last_arrival_offset) {
        Ok(off) => set(ebpf, "TASK_LAYOUT", &[(TASK_LAYOUT_LAST_ARRIVAL, off)]),
        Err(why) => log::info!(
            "unseen switch-ins will not be dated ({why}): thread splits across one are left out"
        ),
    }
    // `task_struct.group_leader` (the process's main thread): with it, an IPC call of a helper
    // thread in a process that serves no client (an engine's I/O thread) is dated on the main
    // thread's clock, and the engine process's part of a request is split by that thread's
    // states; without it, such a part stays unsplit.
    match btf
        .clone()
        .and_then(|b| member_of(b, "task_struct", "group_leader"))
    {
        Ok((off, _)) => set(ebpf, "TASK_LAYOUT", &[(TASK_LAYOUT_GROUP_LEADER, off)]),
        Err(why) => log::info!(
            "an engine's I/O threads will not be dated on its main thread ({why}): its part of \
             a request is not split by thread state"
        ),
    }
    // `tcp_sock.rcv_nxt` and `copied_seq`: with them, a read whose bytes came in several
    // arrivals is dated by part (a request behind other bytes of the read by its own arrival);
    // without them, by its first arrival.
    let tcp = btf.and_then(|b| {
        Ok([
            (TCP_LAYOUT_RCV_NXT, member_of(b, "tcp_sock", "rcv_nxt")?.0),
            (
                TCP_LAYOUT_COPIED_SEQ,
                member_of(b, "tcp_sock", "copied_seq")?.0,
            ),
        ])
    });
    match tcp {
        Ok(offsets) => set(ebpf, "TCP_LAYOUT", &offsets),
        Err(why) => log::info!(
            "reads are dated by their first arrival only ({why}): a request behind other bytes \
             of a read may be dated early"
        ),
    }
}

/// Sets `(index, offset)` entries of the `Array` map `name`.
fn set(ebpf: &mut Ebpf, name: &str, entries: &[(u32, u64)]) {
    let Some(map) = ebpf.map_mut(name) else {
        return;
    };
    match Array::<_, u64>::try_from(map) {
        Ok(mut layout) => {
            for &(i, off) in entries {
                if let Err(e) = layout.set(i, off, 0) {
                    log::warn!("{name}[{i}] not set: {e}");
                }
            }
        }
        Err(e) => log::warn!("{name}: {e}"),
    }
}

/// Byte offset of `task_struct.sched_info.last_arrival`.
fn last_arrival_offset(btf: &Btf) -> Result<u64, String> {
    let (task, sched_info) = member_of(btf, "task_struct", "sched_info")?;
    let Type::Struct(info) = sched_info else {
        return Err("task_struct.sched_info is not a struct".into());
    };
    let (at, _) =
        member(btf, &info, "last_arrival").map_err(|e| format!("{e} (CONFIG_SCHED_INFO off?)"))?;
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
    Err(format!("no member {field}"))
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

    /// The running kernel's BTF, and bpftool's raw dump of it when bpftool is installed (the
    /// witness); `None` (printed) without BTF.
    fn running_btf() -> Option<(btf_rs::Btf, Option<String>)> {
        if !std::path::Path::new(super::VMLINUX_BTF).exists() {
            eprintln!("skipped: no {}", super::VMLINUX_BTF);
            return None;
        }
        let btf = btf_rs::Btf::from_file(super::VMLINUX_BTF).expect("BTF");
        let dump = std::process::Command::new("bpftool")
            .args(["btf", "dump", "file", super::VMLINUX_BTF, "format", "raw"])
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
        Some((btf, dump))
    }

    /// The running kernel (this VM's and CI's have BTF and `CONFIG_SCHED_INFO`) says where
    /// `last_arrival` is; bpftool's dump of the same BTF is the witness where it is installed.
    #[test]
    fn last_arrival_is_found_in_the_running_kernel() {
        let Some((btf, dump)) = running_btf() else {
            return;
        };
        let off = super::last_arrival_offset(&btf).expect("task_struct.sched_info.last_arrival");
        assert!(off > 0 && off.is_multiple_of(8), "offset {off}");
        let Some(dump) = dump else {
            eprintln!("no bpftool: offset {off} not cross-checked");
            return;
        };
        let task = bpftool_bits(&dump, "task_struct", "sched_info").expect("task_struct");
        let info = bpftool_bits(&dump, "sched_info", "last_arrival").expect("sched_info");
        assert_eq!(off, (task + info) / 8, "bpftool: {task} + {info} bits");
    }

    /// `task_struct.group_leader` is found, a pointer, where bpftool's dump says (when
    /// installed).
    #[test]
    fn group_leader_is_found_in_the_running_kernel() {
        let Some((btf, dump)) = running_btf() else {
            return;
        };
        let (off, t) = super::member_of(&btf, "task_struct", "group_leader").expect("group_leader");
        assert!(matches!(t, btf_rs::Type::Ptr(_)), "a pointer");
        assert!(off > 0 && off.is_multiple_of(8), "offset {off}");
        match dump
            .as_deref()
            .and_then(|d| bpftool_bits(d, "task_struct", "group_leader"))
        {
            Some(bits) => assert_eq!(off, bits / 8),
            None => eprintln!("no bpftool: group_leader at {off} not cross-checked"),
        }
    }

    /// `tcp_sock.rcv_nxt` and `copied_seq` are found, where bpftool's dump says (when installed).
    #[test]
    fn tcp_sequence_fields_are_found_in_the_running_kernel() {
        let Some((btf, dump)) = running_btf() else {
            return;
        };
        for field in ["rcv_nxt", "copied_seq"] {
            let (off, _) = super::member_of(&btf, "tcp_sock", field).expect(field);
            assert!(off > 0 && off.is_multiple_of(4), "{field} at {off}");
            match dump
                .as_deref()
                .and_then(|d| bpftool_bits(d, "tcp_sock", field))
            {
                Some(bits) => assert_eq!(off, bits / 8, "{field}"),
                None => eprintln!("no bpftool: {field} at {off} not cross-checked"),
            }
        }
    }
}
