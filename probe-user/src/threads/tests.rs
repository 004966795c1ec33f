use probe_common::{ThreadTime, THREAD_BLOCKED, THREAD_EXITED, THREAD_ON_CPU, THREAD_RUNNABLE};

use super::*;

fn sample(tid: u32, thread: &str, state: u32, since: u64, acc: [u64; 3]) -> Sample {
    Sample {
        tid,
        time: ThreadTime {
            tgid: 100,
            tid,
            state,
            since_ns: since,
            on_cpu_ns: acc[0],
            runnable_ns: acc[1],
            blocked_ns: acc[2],
            ..ThreadTime::default()
        },
        process: "python3".into(),
        thread: thread.into(),
    }
}

#[test]
fn roles_drop_trailing_digits() {
    assert_eq!(role_of("ZMQbg/IO/0"), "ZMQbg/IO/");
    assert_eq!(role_of("pt_tp_12"), "pt_tp_");
    assert_eq!(role_of("VLLM::EngineCor"), "VLLM::EngineCor");
    assert_eq!(role_of("1234"), "1234");
    assert_eq!(role_of("python3"), "python3");
    assert_eq!(role_of("worker-3"), "worker-");
}

#[test]
fn open_interval_counts_in_the_current_state() {
    let s = sample(1, "w", THREAD_RUNNABLE, 1_000, [5, 6, 7]);
    assert_eq!(totals_at(&s.time, 1_500), [5, 506, 7]);
    let s = sample(1, "w", THREAD_EXITED, 1_000, [5, 6, 7]);
    assert_eq!(totals_at(&s.time, 9_999), [5, 6, 7]);
}

#[test]
fn deltas_add_up_per_role_and_never_go_backwards() {
    let mut a = ThreadAccounting::new();
    let (d, forget) = a.update(
        1_000,
        &[
            sample(1, "worker-1", THREAD_ON_CPU, 500, [100, 0, 0]),
            sample(2, "worker-2", THREAD_BLOCKED, 0, [0, 10, 0]),
        ],
        |_| true,
    );
    assert!(forget.is_empty());
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].0.role, "worker-");
    assert_eq!(d[0].1, [600, 10, 1_000]);
    // Later: thread 1 blocked; thread 2's read raced and shows less blocked time than before.
    let (d, _) = a.update(
        2_000,
        &[
            sample(1, "worker-1", THREAD_BLOCKED, 1_500, [1_100, 0, 0]),
            sample(2, "worker-2", THREAD_BLOCKED, 1_800, [0, 10, 0]),
        ],
        |_| true,
    );
    assert_eq!(d[0].1, [500, 0, 500]);
    assert_eq!(a.totals()[0].1, [1_100, 10, 1_500]);
}

#[test]
fn exited_and_untraced_threads_are_read_once_more_then_dropped() {
    let mut a = ThreadAccounting::new();
    a.update(0, &[sample(1, "t", THREAD_ON_CPU, 0, [0; 3])], |_| true);
    let (d, forget) = a.update(
        100,
        &[sample(1, "t", THREAD_EXITED, 80, [80, 0, 0])],
        |_| true,
    );
    assert_eq!(d[0].1, [80, 0, 0]);
    assert_eq!(forget, vec![1]);
    assert_eq!(a.threads(), 0);
    let (_, forget) = a.update(200, &[sample(2, "t", THREAD_ON_CPU, 0, [0; 3])], |_| false);
    assert_eq!(forget, vec![2]);
}

#[test]
fn labels_are_bounded_and_time_is_kept_under_other() {
    let mut a = ThreadAccounting::new();
    let many: Vec<Sample> = (0..40)
        .map(|i| sample(i, &format!("role{i}x"), THREAD_ON_CPU, 0, [0; 3]))
        .collect();
    let (d, _) = a.update(10, &many, |_| true);
    let roles: Vec<&str> = d.iter().map(|(k, _)| k.role.as_str()).collect();
    assert_eq!(roles.len(), MAX_ROLES_PER_PROCESS + 1);
    assert!(roles.contains(&OTHER));
    let total: u64 = d.iter().map(|(_, v)| v[0]).sum();
    assert_eq!(total, 40 * 10, "time under `other` is kept");
}
