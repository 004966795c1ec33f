//! The agent's own endpoint under hostile clients (root; docs/security.md): a flood of idle
//! connections, paging of the request log, `/api/*` refused off loopback without the token (from
//! a network namespace this test makes), the shipped manifests' command lines, and TLS.

use std::{net::TcpStream, process::Command, time::Duration};

use serde_json::{json, Value};
use tests::{
    free_port, http_get, node_under_probe, raise_nofile, require_root, start_node,
    traffic::{chat_req, run_concurrent},
    wait_for, Probe, Proc,
};

/// 1,100 idle connections to the agent's port (more than systemd's default open-file limit)
/// neither stop `/metrics` nor make the agent drop its live target. A scrape while the flood is
/// held open is answered at once: a full house gives the new connection the slot of the
/// longest-idle one, so it does not wait for the 5 s header timeout to free a slot.
#[test]
fn a_connection_flood_to_the_agent_keeps_the_target() {
    let Some(t) = node_under_probe("a_connection_flood_to_the_agent_keeps_the_target") else {
        return;
    };
    // This test's own descriptors: 1,100 sockets need more than the usual soft limit.
    raise_nofile(4096);
    let idle: Vec<TcpStream> = (0..1100)
        .filter_map(|_| TcpStream::connect(&t.probe.addr).ok())
        .collect();
    assert!(idle.len() > 1000, "opened {} connections", idle.len());
    let t0 = std::time::Instant::now();
    let (code, page) = http_get(&t.probe.addr, "/metrics").expect("scrape during the flood");
    let took = t0.elapsed();
    eprintln!(
        "/metrics with {} idle connections held open: {code} in {took:?}",
        idle.len()
    );
    assert_eq!(code, 200);
    assert!(page.contains("llm_probe_targets 1"), "{page}");
    assert!(took < Duration::from_secs(5), "waited {took:?} for a slot");
    // Housekeeping ticks with the flood open: the target must stay traced. The 64 connections
    // the agent took are closed by its 5 s header timeout, which frees its slots again.
    std::thread::sleep(Duration::from_secs(7));
    let (_, h) = t.probe.health();
    assert_eq!(h["checks"]["targets"]["value"], json!(1.0), "{h}");
    let page = t.probe.metrics();
    assert!(page.contains("llm_probe_targets 1"), "{page}");
    drop(idle);
    // Still timing requests afterwards.
    run_concurrent(
        &t.addr,
        vec![chat_req("after-flood", "m", true, 2, &json!({}))],
    );
    t.probe.wait_requests(1, Duration::from_secs(10));
    let _ = &t.node;
}

/// `/api/v1/requests` answers at most `limit` (and at most 1,000) requests, newest last, and
/// `after` pages forward.
#[test]
fn the_request_log_is_paged() {
    let Some(t) = node_under_probe("the_request_log_is_paged") else {
        return;
    };
    let reqs: Vec<_> = (0..30)
        .map(|i| chat_req(&format!("page-{i}"), "m", false, 1, &json!({})))
        .collect();
    run_concurrent(&t.addr, reqs);
    t.probe.wait_requests(30, Duration::from_secs(10));
    let get = |q: &str| -> Value {
        let (code, body) = http_get(&t.probe.addr, &format!("/api/v1/requests{q}")).expect("GET");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).expect("JSON")
    };
    let page = get("?limit=5");
    let items = page["requests"].as_array().expect("requests");
    assert_eq!(items.len(), 5);
    let last_seq = items[4]["seq"].as_u64().expect("seq");
    assert_eq!(page["finished_total"], json!(30));
    let all = get("");
    assert_eq!(all["requests"].as_array().map(Vec::len), Some(30));
    assert_eq!(
        get(&format!("?after={last_seq}"))["requests"]
            .as_array()
            .map(Vec::len),
        Some(0)
    );
    let (code, _) = http_get(&t.probe.addr, "/api/v1/requests?limit=x").expect("GET");
    assert_eq!(code, 400);
}

/// A network namespace joined to this one by a veth pair (10.213.7.1 here, 10.213.7.2 there):
/// a client whose address is not loopback, on this machine. Removed on drop.
struct PeerNamespace {
    name: String,
    link: String,
}

impl PeerNamespace {
    fn new() -> Option<Self> {
        let id = std::process::id() % 100_000;
        let ns = Self {
            name: format!("llmp{id}"),
            link: format!("llmp{id}a"),
        };
        let peer = format!("llmp{id}b");
        let steps: [&[&str]; 8] = [
            &["netns", "add", &ns.name],
            &[
                "link", "add", &ns.link, "type", "veth", "peer", "name", &peer,
            ],
            &["link", "set", &peer, "netns", &ns.name],
            &["addr", "add", "10.213.7.1/30", "dev", &ns.link],
            &["link", "set", &ns.link, "up"],
            &["-n", &ns.name, "addr", "add", "10.213.7.2/30", "dev", &peer],
            &["-n", &ns.name, "link", "set", &peer, "up"],
            &["-n", &ns.name, "link", "set", "lo", "up"],
        ];
        for step in steps {
            let ok = Command::new("ip")
                .args(step)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                println!(
                    "SKIP: `ip {}` failed: no network namespace for this test",
                    step.join(" ")
                );
                return None;
            }
        }
        Some(ns)
    }

    /// HTTP status of GET `url` from inside the namespace, with `headers`.
    fn status(&self, url: &str, headers: &[&str]) -> String {
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.name,
            "curl",
            "-s",
            "-m",
            "5",
            "-o",
            "/dev/null",
        ]);
        cmd.args(["-w", "%{http_code}"]);
        for h in headers {
            cmd.args(["-H", h]);
        }
        let out = cmd.arg(url).output().expect("curl in the namespace");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for PeerNamespace {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.link])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// An agent listening on every address answers `/metrics` to a client outside loopback but
/// refuses it `/api/*` (403) unless it sends the `--api-token-file` token; loopback clients keep
/// `/api/*` without one. The client is in a network namespace this test makes.
#[test]
fn api_is_refused_off_loopback_without_the_token() {
    if !require_root("api_is_refused_off_loopback_without_the_token") {
        return;
    }
    let Some(ns) = PeerNamespace::new() else {
        return;
    };
    let port = free_port();
    let _node = start_node(port);
    let token = "llm-probe-test-token-0123456789abcdef";
    let token_file = std::env::temp_dir().join(format!("llmp-token-{}", std::process::id()));
    std::fs::write(&token_file, format!("{token}\n")).expect("token file");
    let listen_port = free_port();
    let probe = Probe::start_on(
        &[
            "--port".into(),
            port.to_string(),
            "--api-token-file".into(),
            token_file.display().to_string(),
        ],
        &format!("0.0.0.0:{listen_port}"),
    );
    let base = format!("http://10.213.7.1:{listen_port}");
    let bearer = format!("Authorization: Bearer {token}");
    assert_eq!(ns.status(&format!("{base}/metrics"), &[]), "200");
    assert_eq!(ns.status(&format!("{base}/health"), &[]), "200");
    assert_eq!(ns.status(&format!("{base}/api/v1/requests"), &[]), "403");
    assert_eq!(
        ns.status(
            &format!("{base}/api/v1/requests"),
            &["Authorization: Bearer wrong-token-0000000000"]
        ),
        "403"
    );
    assert_eq!(ns.status(&format!("{base}/api/v1/memleak"), &[]), "403");
    assert_eq!(
        ns.status(&format!("{base}/api/v1/requests"), &[&bearer]),
        "200"
    );
    let (code, _) = http_get(&probe.addr, "/api/v1/requests").expect("loopback GET");
    assert_eq!(code, 200, "loopback needs no token");
    let _ = std::fs::remove_file(token_file);
}

/// With `--tls-cert`/`--tls-key` the endpoint speaks HTTPS only: curl with the certificate
/// gets `/metrics` and `/health`, a plain-HTTP client gets no answer. The certificate is made
/// here with openssl (self-signed, for 127.0.0.1).
#[test]
fn the_endpoint_serves_tls_when_given_a_certificate() {
    if !require_root("the_endpoint_serves_tls_when_given_a_certificate") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("llmp-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let port = free_port();
    let _node = start_node(port);
    let listen = free_port();
    let mut agent = Proc::spawn(
        "llm-probe-tls",
        Command::new(tests::probe_bin())
            .args(["run", "--port", &port.to_string()])
            .args(["--listen", &format!("127.0.0.1:{listen}")])
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key),
    );
    let url = format!("https://127.0.0.1:{listen}");
    let curl = |path: &str| -> String {
        let out = Command::new("curl")
            .args([
                "-s",
                "-m",
                "5",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--cacert",
            ])
            .arg(&cert)
            .arg(format!("{url}{path}"))
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    wait_for("the HTTPS endpoint", Duration::from_secs(30), || {
        assert!(agent.alive(), "llm-probe exited:\n{}", agent.log_text());
        curl("/health") == "200"
    });
    assert_eq!(curl("/metrics"), "200");
    assert_eq!(curl("/api/v1/requests"), "200", "loopback needs no token");
    let plain = http_get(&format!("127.0.0.1:{listen}"), "/metrics");
    assert!(
        plain.as_ref().map_or(true, |(code, _)| *code != 200),
        "plain HTTP answered: {plain:?}"
    );
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The shipped manifests, run as shipped: the `DaemonSet`'s container args and the systemd
/// unit's default and documented network command lines (with the engine port and the listen port
/// swapped for free ones) keep `/api/*` off the network. From another network namespace
/// `/metrics` answers where the listener is on the network, `/api/v1/requests` never does
/// without a token (403), and the unit's default listener is not reachable at all.
#[test]
fn shipped_manifests_keep_api_off_the_network() {
    if !require_root("shipped_manifests_keep_api_off_the_network") {
        return;
    }
    let Some(ns) = PeerNamespace::new() else {
        return;
    };
    let root = tests::workspace_root();
    let out = tests::output_ok(
        "reading the DaemonSet's args",
        Command::new(tests::python()).args([
            "-c",
            "import json, sys, yaml\n\
             for d in yaml.safe_load_all(open(sys.argv[1])):\n\
             \x20   if d and d.get('kind') == 'DaemonSet':\n\
             \x20       c = d['spec']['template']['spec']['containers'][0]\n\
             \x20       print(json.dumps([str(a) for a in c['args']]))",
            &root
                .join("deploy/kubernetes/daemonset.yaml")
                .display()
                .to_string(),
        ]),
    );
    let daemonset: Vec<String> =
        serde_json::from_slice(&out.stdout).expect("DaemonSet args as JSON");
    let unit =
        std::fs::read_to_string(root.join("deploy/systemd/llm-probe.service")).expect("unit");
    let unit_args = |prefix: &str| -> Vec<String> {
        let line = unit
            .lines()
            .find_map(|l| l.trim_start().strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in the unit"));
        let words = line.trim_end_matches('"').split_whitespace();
        std::iter::once("run".to_owned())
            .chain(words.map(str::to_owned))
            .collect()
    };
    let cases = [
        ("DaemonSet", daemonset),
        ("unit default", unit_args("Environment=\"LLM_PROBE_ARGS=")),
        ("unit network example", unit_args("#   LLM_PROBE_ARGS=\"")),
    ];
    let port = free_port();
    let _node = start_node(port);
    for (what, args) in cases {
        assert_eq!(
            args.first().map(String::as_str),
            Some("run"),
            "{what}: {args:?}"
        );
        let i = args.iter().position(|a| a == "--listen").expect("--listen");
        let host = args[i + 1]
            .rsplit_once(':')
            .expect("host:port")
            .0
            .to_owned();
        let listen = format!("{host}:{}", free_port());
        let mut run: Vec<String> = Vec::new();
        let mut it = args.iter().skip(1).enumerate();
        while let Some((j, a)) = it.next() {
            if j + 1 == i {
                it.next(); // --listen's value: Probe::start_on passes ours
                continue;
            }
            run.push(a.replace("8000", &port.to_string()));
        }
        let probe = Probe::start_on(&run, &listen);
        let base = format!(
            "http://10.213.7.1:{}",
            listen.rsplit(':').next().unwrap_or_default()
        );
        let (metrics, api) = (
            ns.status(&format!("{base}/metrics"), &[]),
            ns.status(&format!("{base}/api/v1/requests"), &[]),
        );
        eprintln!(
            "{what}: llm-probe {} --listen {listen}: /metrics {metrics}, /api {api}",
            run.join(" ")
        );
        if host == "127.0.0.1" {
            assert_eq!((metrics.as_str(), api.as_str()), ("000", "000"), "{what}");
        } else {
            assert_eq!((metrics.as_str(), api.as_str()), ("200", "403"), "{what}");
        }
        let (code, _) = http_get(&probe.addr, "/api/v1/requests").expect("loopback GET");
        assert_eq!(code, 200, "{what}: loopback needs no token");
    }
}
