//! The OCI image, built as `cargo xtask image` builds it, run with exactly the `DaemonSet`'s
//! settings (read from deploy/kubernetes/daemonset.yaml), attached by `--port` to a server on the
//! host: `/metrics` from the container counts that server's requests. Also: two builds of the
//! same binary give the same image ID, and the image stays small. Needs root, buildah, podman
//! and runc (`cargo xtask setup` installs them on Debian; without them the test says SKIP).

use std::{process::Command, time::Duration};

use serde_json::{json, Value};
use tests::{
    free_port, http_get, image, metric_sum, output_ok, probe_bin, require_root, start_node,
    traffic::{chat_req, run_one},
    wait_for, workspace_root,
};

/// Requests sent through the traced server.
const REQUESTS: usize = 20;

/// The `DaemonSet`'s pod spec as JSON (`PyYAML` from the test venv).
fn daemonset_pod() -> Value {
    let out = output_ok(
        "reading the DaemonSet",
        Command::new(tests::python()).args([
            "-c",
            "import json, sys, yaml\n\
             for d in yaml.safe_load_all(open(sys.argv[1])):\n\
             \x20   if d and d.get('kind') == 'DaemonSet':\n\
             \x20       print(json.dumps(d['spec']['template']['spec']))",
            &workspace_root()
                .join("deploy/kubernetes/daemonset.yaml")
                .display()
                .to_string(),
        ]),
    );
    serde_json::from_slice(&out.stdout).expect("pod spec as JSON")
}

/// containerd's `RuntimeDefault` seccomp profile as far as the probe is concerned: podman's
/// default (containers/common, which CRI-O uses too) with bpf and `perf_event_open` allowed to
/// `CAP_BPF` / `CAP_PERFMON` holders as in containerd's profile (containerd/containerd#7301).
/// Written to `dir`; returns its path.
fn containerd_like_seccomp(dir: &std::path::Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string("/usr/share/containers/seccomp.json")
        .expect("podman's default seccomp profile");
    let mut profile: Value = serde_json::from_str(&text).expect("seccomp JSON");
    // Its rules for the two: ALLOW with CAP_SYS_ADMIN, ERRNO without it. containerd has ALLOW
    // with CAP_SYS_ADMIN, ALLOW with CAP_BPF / CAP_PERFMON, and no ERRNO rule of its own (the
    // profile's default action refuses everyone else).
    let mut widened = 0;
    for rule in profile["syscalls"].as_array_mut().expect("syscalls") {
        let refuses = rule["action"] == "SCMP_ACT_ERRNO";
        let Some(names) = rule["names"].as_array_mut().filter(|_| refuses) else {
            continue;
        };
        let before = names.len();
        names.retain(|n| n != "bpf" && n != "perf_event_open");
        widened += before - names.len();
    }
    assert!(
        widened > 0,
        "no refusal of bpf in podman's profile: {text:.200}"
    );
    let rules = profile["syscalls"].as_array_mut().expect("syscalls");
    for (name, cap) in [("bpf", "CAP_BPF"), ("perf_event_open", "CAP_PERFMON")] {
        rules.push(json!({
            "names": [name],
            "action": "SCMP_ACT_ALLOW",
            "includes": {"caps": [cap]},
        }));
    }
    let path = dir.join("seccomp-containerd-like.json");
    std::fs::write(&path, profile.to_string()).expect("writing the profile");
    path
}

/// `podman run` flags for the `DaemonSet`'s settings: host PID and network namespaces, the user,
/// read-only root, `no_new_privs`, exactly its capabilities, its seccomp rule, its volumes and
/// environment. Every setting the test does not translate fails the test, so that a new one
/// cannot be skipped.
fn podman_flags(pod: &Value, seccomp: &std::path::Path) -> Vec<String> {
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    let mut f: Vec<String> = Vec::new();
    let mut push = |s: &str| f.push(s.to_owned());
    if pod["hostPID"] == true {
        push("--pid=host");
    }
    if pod["hostNetwork"] == true {
        push("--network=host");
    }
    push(&format!(
        "--user={}:{}",
        sc["runAsUser"].as_u64().expect("runAsUser"),
        sc["runAsGroup"].as_u64().expect("runAsGroup")
    ));
    assert_eq!(sc["privileged"], false);
    if sc["readOnlyRootFilesystem"] == true {
        // podman adds writable tmpfs on /tmp, /run, /var/tmp unless told not to; Kubernetes
        // does not.
        push("--read-only");
        push("--read-only-tmpfs=false");
    }
    if sc["allowPrivilegeEscalation"] == false {
        push("--security-opt=no-new-privileges");
    }
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    push("--cap-drop=all");
    for cap in sc["capabilities"]["add"].as_array().expect("caps") {
        push(&format!("--cap-add=CAP_{}", cap.as_str().expect("cap")));
    }
    match pod["securityContext"]["seccompProfile"]["type"].as_str() {
        Some("RuntimeDefault") => push(&format!("--security-opt=seccomp={}", seccomp.display())),
        Some("Unconfined") => push("--security-opt=seccomp=unconfined"),
        other => panic!("seccomp profile {other:?} not translated for podman"),
    }
    let apparmor = std::fs::read_to_string("/sys/module/apparmor/parameters/enabled")
        .is_ok_and(|s| s.trim() == "Y");
    if sc["appArmorProfile"]["type"] == "Unconfined" && apparmor {
        push("--security-opt=apparmor=unconfined");
    }
    let volumes = pod["volumes"].as_array().expect("volumes");
    for m in c["volumeMounts"].as_array().expect("volumeMounts") {
        let v = volumes
            .iter()
            .find(|v| v["name"] == m["name"])
            .expect("mount's volume");
        let to = m["mountPath"].as_str().expect("mountPath");
        if let Some(from) = v["hostPath"]["path"].as_str() {
            let ro = if m["readOnly"] == true { ":ro" } else { "" };
            push(&format!("--volume={from}:{to}{ro}"));
        } else if v["emptyDir"]["medium"] == "Memory" {
            let size = v["emptyDir"]["sizeLimit"]
                .as_str()
                .expect("sizeLimit")
                .replace("Mi", "m");
            push(&format!("--tmpfs={to}:rw,size={size}"));
        } else {
            panic!("volume kind not translated for podman: {v}");
        }
    }
    for e in c["env"].as_array().expect("env") {
        push(&format!(
            "--env={}={}",
            e["name"].as_str().expect("name"),
            e["value"].as_str().expect("value")
        ));
    }
    // Kubernetes passes the runtime's own limits on (containerd's unit: LimitNOFILE=infinity);
    // podman needs them said: its defaults, and an nproc limit above a few thousand, make runc
    // fail here with "error setting rlimit ...: operation not permitted". The agent needs one fd
    // per traced connection it seeds and a handful of threads.
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid resource and a struct to fill.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut l) };
    let nofile = l.rlim_max.min(65_536);
    push(&format!("--ulimit=nofile={nofile}:{nofile}"));
    push("--ulimit=nproc=4096:4096");
    f
}

/// The `DaemonSet`'s args with the engine's port and the listen port swapped for this test's, and
/// without `--target-cgroup /kubepods`: the server here runs on the host, not in a pod.
fn daemonset_args(pod: &Value, engine: u16, listen: u16) -> Vec<String> {
    let shipped: Vec<String> = pod["containers"][0]["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("arg").to_owned())
        .collect();
    let mut args = Vec::new();
    let mut it = shipped.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--target-cgroup" => {
                it.next();
            }
            "--port" => {
                it.next();
                args.extend(["--port".to_owned(), engine.to_string()]);
            }
            "--listen" => {
                it.next();
                args.extend(["--listen".to_owned(), format!("0.0.0.0:{listen}")]);
            }
            _ => args.push(a.replace(":8000/", &format!(":{engine}/"))),
        }
    }
    args
}

/// Removes the test's image whatever happens (the build cache is not kept: `--layers=false`).
struct TestImage(String);
impl Drop for TestImage {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args(image::STORAGE)
            .args(["rmi", "--force", &self.0])
            .output();
    }
}

/// Removes the container whatever happens.
struct Container(String);
impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args(image::STORAGE)
            .args(["rm", "-f", &self.0])
            .output();
    }
}

#[test]
fn image_runs_with_the_daemonset_settings_and_times_host_requests() {
    if !require_root("image_runs_with_the_daemonset_settings_and_times_host_requests") {
        return;
    }
    if !image::tools_present() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must have buildah, podman and runc (cargo xtask setup installs them)"
        );
        eprintln!("SKIP image test: buildah, podman or runc missing (cargo xtask setup)");
        return;
    }
    let root = workspace_root();
    let context = root.join("target/image-test");
    image::stage(&probe_bin(), &root, &context).expect("staging");
    let version = "test";
    let first = image::build(&context, version, "test-revision", image::SOURCE).expect("build");
    let _image = TestImage(first.reference.clone());
    let second = image::build(&context, version, "test-revision", image::SOURCE).expect("rebuild");
    eprintln!(
        "image {} {}: {:.1} MiB",
        first.reference,
        first.id,
        first.size as f64 / 1_048_576.0
    );
    assert_eq!(first.id, second.id, "same inputs, different image");
    assert!(
        first.size < 64 << 20,
        "image of {} bytes: more than the binary and its libraries",
        first.size
    );

    let engine = free_port();
    let _node = start_node(engine);
    let listen = free_port();
    let pod = daemonset_pod();
    let name = format!("llm-probe-test-{listen}");
    let seccomp = containerd_like_seccomp(&context);
    let flags = podman_flags(&pod, &seccomp);
    let args = daemonset_args(&pod, engine, listen);

    // With podman's own default profile (CRI-O's rule) the same container cannot load its
    // programs, and says why.
    let refused = Command::new("podman")
        .args(image::STORAGE)
        .args(["run", "--rm", "--runtime", "runc"])
        .args(
            flags
                .iter()
                .filter(|f| !f.starts_with("--security-opt=seccomp=")),
        )
        .arg(&first.reference)
        .args(&args)
        .output()
        .expect("podman run");
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && said.contains("seccomp profile"),
        "{refused:?}"
    );
    let out = output_ok(
        "podman run",
        Command::new("podman")
            .args(image::STORAGE)
            .args(["run", "--detach", "--runtime", "runc", "--name", &name])
            .args(&flags)
            .arg(&first.reference)
            .args(&args),
    );
    let _container = Container(name.clone());
    assert!(out.status.success(), "{out:?}");
    let addr = format!("127.0.0.1:{listen}");
    let logs = || {
        let o = Command::new("podman")
            .args(image::STORAGE)
            .args(["logs", &name])
            .output()
            .expect("podman logs");
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    let up = (0..300).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        http_get(&addr, "/health").is_ok()
    });
    assert!(up, "the container's probe did not come up:\n{}", logs());

    let engine_addr = format!("127.0.0.1:{engine}");
    for i in 0..REQUESTS {
        let s = run_one(
            &engine_addr,
            chat_req(&format!("img{i}"), "m", true, 4, &json!({})),
        );
        assert!(s.error.is_none(), "{s:?}");
    }
    wait_for(
        "the container to count every request",
        Duration::from_secs(10),
        || {
            http_get(&addr, "/metrics").is_ok_and(|(_, body)| {
                metric_sum(&body, "llm_requests_total", &[]) == REQUESTS as f64
            })
        },
    );
    let (_, body) = http_get(&addr, "/metrics").expect("metrics");
    assert_eq!(
        metric_sum(&body, "llm_generated_tokens_total", &[]),
        (REQUESTS * 4) as f64,
        "{body}"
    );

    // The process in the container holds no more than the `DaemonSet` grants, under no_new_privs,
    // on a read-only root.
    let pid = output_ok(
        "podman inspect",
        Command::new("podman").args(image::STORAGE).args([
            "inspect",
            "--format",
            "{{.State.Pid}}",
            &name,
        ]),
    );
    let pid = String::from_utf8_lossy(&pid.stdout).trim().to_owned();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map_or(u64::MAX, |v| {
                u64::from_str_radix(v.trim(), 16).unwrap_or(u64::MAX)
            })
    };
    // CAP_DAC_READ_SEARCH 2, CAP_SYS_PTRACE 19, CAP_PERFMON 38, CAP_BPF 39.
    let granted: u64 = (1 << 2) | (1 << 19) | (1 << 38) | (1 << 39);
    assert_eq!(field("CapBnd:") & !granted, 0, "{status}");
    assert_eq!(field("CapEff:") & !granted, 0, "{status}");
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).expect("mounts");
    let root_mount = mountinfo
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .expect("root mount");
    assert!(
        root_mount
            .split_whitespace()
            .nth(5)
            .is_some_and(|o| o.split(',').any(|x| x == "ro")),
        "root is not read-only: {root_mount}"
    );
    assert!(logs().contains("socket capture path:"), "{}", logs());
}
