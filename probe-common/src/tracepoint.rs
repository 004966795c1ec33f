//! Fields the kernel programs read from tracepoint records at fixed offsets, with the offsets and
//! sizes of the running kernel's format files (`/sys/kernel/tracing/events/<category>/<event>/
//! format`, Linux 6.x). The agent checks every one against the format file before attaching the
//! program that reads it, and leaves a program unattached when its layout differs. (Raw
//! tracepoint programs — the `sock:` capture path, `sched_switch`, `sched_wakeup`, `sk_data_ready` — read the `TP_PROTO`
//! arguments instead; the kernel refuses their attach when a program reads more arguments than
//! the tracepoint has.)

/// One field of one tracepoint record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub category: &'static str,
    pub event: &'static str,
    pub name: &'static str,
    pub offset: usize,
    pub size: usize,
}

const fn field(
    category: &'static str,
    event: &'static str,
    name: &'static str,
    offset: usize,
    size: usize,
) -> Field {
    Field {
        category,
        event,
        name,
        offset,
        size,
    }
}

pub const NEWTASK_PID: Field = field("task", "task_newtask", "pid", 8, 4);
pub const NEWTASK_CLONE_FLAGS: Field = field("task", "task_newtask", "clone_flags", 32, 8);
pub const EXIT_GROUP_DEAD: Field = field("sched", "sched_process_exit", "group_dead", 32, 1);
pub const SET_STATE_SKADDR: Field = field("sock", "inet_sock_set_state", "skaddr", 8, 8);
pub const SET_STATE_NEWSTATE: Field = field("sock", "inet_sock_set_state", "newstate", 20, 4);
pub const SET_STATE_SPORT: Field = field("sock", "inet_sock_set_state", "sport", 24, 2);
pub const SET_STATE_PROTOCOL: Field = field("sock", "inet_sock_set_state", "protocol", 30, 2);
pub const RECV_LENGTH_SK: Field = field("sock", "sock_recv_length", "sk", 8, 8);
/// Syscall tracepoints: the first argument (enter) or the return value (exit), then 8-byte slots.
pub const SYSCALL_ARGS_OFFSET: usize = 16;

/// Every fixed field read by a non-syscall program.
pub const FIELDS: [Field; 8] = [
    NEWTASK_PID,
    NEWTASK_CLONE_FLAGS,
    EXIT_GROUP_DEAD,
    SET_STATE_SKADDR,
    SET_STATE_NEWSTATE,
    SET_STATE_SPORT,
    SET_STATE_PROTOCOL,
    RECV_LENGTH_SK,
];
