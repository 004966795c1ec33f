#!/usr/bin/env python3
"""Offline checks of llm-probe's deployment files.

    python3 tests/deploy/check_deploy.py        (needs PyYAML and kubernetes-validate)

- deploy/kubernetes/*.yaml: every core-kind object validates (strict: unknown fields are errors)
  against the Kubernetes OpenAPI schemas that kubernetes-validate ships; the Prometheus Operator
  kinds (PodMonitor, PrometheusRule) are checked structurally; the objects agree with each other
  (selectors, port names, namespace, service account, the job name the alert rules expect);
  kustomization.yaml lists exactly the manifests.
- deploy/kubernetes/prometheusrule.yaml: spec.groups is exactly the `groups` of
  deploy/prometheus/llm-probe-rules.yml (regenerate with tests/deploy/make_prometheusrule.py).
- deploy/systemd/llm-probe.service: parses, has the required settings and none of the hardening
  options that would blind the probe; `systemd-analyze verify` when available.
- docs/scaling.md: its YAML blocks parse; with promtool, the recording rules pass `check rules`
  and tests/deploy/fleet_rules_test.yml, the prometheus.yml snippets `check config`; its
  series-count table is what tests/deploy/cardinality.py prints.

Exits 1 with one line per problem; prints a one-line summary either way.
Environment: LLM_PROBE_K8S_VERSION (default 1.33) picks the Kubernetes schema version.
"""

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
K8S_DIR = os.path.join(ROOT, "deploy", "kubernetes")
RULES = os.path.join(ROOT, "deploy", "prometheus", "llm-probe-rules.yml")
UNIT = os.path.join(ROOT, "deploy", "systemd", "llm-probe.service")
SCALING = os.path.join(ROOT, "docs", "scaling.md")

NAMESPACE = "llm-probe"
CAPS = {"BPF", "PERFMON", "SYS_PTRACE", "DAC_READ_SEARCH"}
K8S_VERSION = os.environ.get("LLM_PROBE_K8S_VERSION", "1.33")
CRD_KINDS = {("monitoring.coreos.com/v1", "PodMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}
REGEN = "python3 tests/deploy/make_prometheusrule.py"

try:
    import yaml
except ImportError:
    sys.exit("check_deploy: PyYAML is missing (pip install pyyaml kubernetes-validate)")
try:
    import kubernetes_validate
    from kubernetes_validate import utils as kv_utils
except ImportError:
    sys.exit("check_deploy: kubernetes-validate is missing (pip install kubernetes-validate)")

sys.path.insert(0, HERE)
import cardinality  # noqa: E402  (same directory)
import make_prometheusrule  # noqa: E402

errors = []
notes = []
counts = {"objects": 0, "schema": 0, "crd": 0, "cross": 0, "unit": 0, "doc": 0}


def fail(where, msg):
    errors.append(f"{where}: {msg}")


def rel(path):
    return os.path.relpath(path, ROOT)


def cross(ok, where, msg):
    counts["cross"] += 1
    if not ok:
        fail(where, msg)
    return ok


# --------------------------------------------------------------------------------- kubernetes
def schema_version():
    """K8S_VERSION if this kubernetes-validate ships it, else its newest (with a note)."""
    versions = kv_utils.all_versions()
    mm = lambda v: tuple(int(x) for x in v.split(".")[:2])  # noqa: E731
    want = mm(K8S_VERSION)
    usable = [v for v in versions if mm(v) <= want]
    if usable and mm(usable[-1]) == want:
        return K8S_VERSION
    newest = max(versions, key=mm)
    notes.append(f"kubernetes-validate {kubernetes_validate.__version__} has no {K8S_VERSION} "
                 f"schemas; used {'.'.join(map(str, mm(newest)))}")
    return ".".join(map(str, mm(newest)))


def load_manifests():
    objs = []  # (file, obj)
    files = sorted(f for f in os.listdir(K8S_DIR) if f.endswith((".yaml", ".yml")))
    for f in files:
        path = os.path.join(K8S_DIR, f)
        try:
            with open(path, encoding="utf-8") as fh:
                docs = [d for d in yaml.safe_load_all(fh) if d is not None]
        except yaml.YAMLError as e:
            fail(rel(path), f"not valid YAML: {e}")
            continue
        if not docs:
            fail(rel(path), "empty")
        for d in docs:
            if not isinstance(d, dict):
                fail(rel(path), "a document is not a mapping")
                continue
            objs.append((f, d))
    return files, objs


def validate_core(version, f, obj):
    where = f"deploy/kubernetes/{f} {obj.get('kind')}"
    try:
        kubernetes_validate.validate(obj, version, strict=True)
        counts["schema"] += 1
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path)
        fail(where, f"schema {version}: {path}: {e.message}")
    except kubernetes_validate.SchemaNotFoundError as e:
        fail(where, e.message)


def validate_crd_structure(f, obj):
    where = f"deploy/kubernetes/{f} {obj.get('kind')}"
    counts["crd"] += 1
    md = obj.get("metadata")
    if not isinstance(md, dict) or not md.get("name"):
        fail(where, "metadata.name missing")
    if not isinstance(obj.get("spec"), dict):
        fail(where, "spec missing")
        return False
    extra = set(obj) - {"apiVersion", "kind", "metadata", "spec"}
    if extra:
        fail(where, f"unexpected top-level fields {sorted(extra)}")
    return True


def subset(sel, labels):
    return isinstance(sel, dict) and bool(sel) and all(labels.get(k) == v for k, v in sel.items())


def rules_job_names():
    """Job names the alert rules select on (e.g. up{job="llm-probe"})."""
    try:
        text = open(RULES, encoding="utf-8").read()
    except OSError:
        return set()
    return set(re.findall(r'job\s*=\s*"([^"]+)"', text))


def check_kubernetes():
    files, objs = load_manifests()
    counts["objects"] = len(objs)
    version = schema_version()
    by_kind = {}
    for f, o in objs:
        kind, api = o.get("kind"), o.get("apiVersion")
        if not kind or not api:
            fail(f"deploy/kubernetes/{f}", "apiVersion/kind missing")
            continue
        by_kind.setdefault(kind, []).append((f, o))
        if kind == "Kustomization":
            continue
        if (api, kind) in CRD_KINDS:
            validate_crd_structure(f, o)
        else:
            validate_core(version, f, o)
        if kind != "Namespace":
            cross(o.get("metadata", {}).get("namespace") == NAMESPACE, f"deploy/kubernetes/{f}",
                  f"{kind} is not in namespace {NAMESPACE}")

    def one(kind):
        items = by_kind.get(kind, [])
        if len(items) != 1:
            fail("deploy/kubernetes", f"expected exactly one {kind}, found {len(items)}")
            return None, None
        return items[0]

    for kind in ("Namespace", "ServiceAccount", "DaemonSet", "Service", "PodMonitor",
                 "PrometheusRule", "Kustomization"):
        one(kind)

    # ---- Kustomization lists every manifest, and nothing else
    kf, k = one("Kustomization")
    if k:
        listed = k.get("resources") or []
        others = sorted(f for f in files if f != kf)
        cross(sorted(listed) == others, f"deploy/kubernetes/{kf}",
              f"resources {sorted(listed)} != manifests in the directory {others}")
        kubectl = shutil.which("kubectl")
        if kubectl:
            r = subprocess.run([kubectl, "kustomize", K8S_DIR], capture_output=True, text=True,
                               timeout=60)
            if r.returncode != 0:
                fail(f"deploy/kubernetes/{kf}", f"kubectl kustomize failed: {r.stderr.strip()}")
            else:
                n = len([d for d in yaml.safe_load_all(r.stdout) if d])
                if cross(n == len(objs) - 1, f"deploy/kubernetes/{kf}",
                         f"kubectl kustomize renders {n} objects, expected {len(objs) - 1}"):
                    notes.append(f"kubectl kustomize: renders all {n} objects")
        else:
            notes.append("kubectl not found: `kubectl kustomize` skipped")

    # ---- Namespace
    nf, ns = one("Namespace")
    if ns:
        cross(ns["metadata"].get("name") == NAMESPACE, f"deploy/kubernetes/{nf}",
              f"namespace is not named {NAMESPACE}")

    # ---- DaemonSet
    df, ds = one("DaemonSet")
    pod_labels, port_name, port_num, container = {}, None, None, None
    if ds:
        w = f"deploy/kubernetes/{df}"
        spec = ds.get("spec", {})
        tmpl = spec.get("template", {})
        pod_labels = tmpl.get("metadata", {}).get("labels", {}) or {}
        cross(subset(spec.get("selector", {}).get("matchLabels"), pod_labels), w,
              "spec.selector.matchLabels does not match the pod template's labels")
        pod = tmpl.get("spec", {})
        cross(pod.get("hostPID") is True, w, "hostPID must be true (the engine's /proc and pids)")
        cross(pod.get("hostNetwork") is not True or pod.get("dnsPolicy") == "ClusterFirstWithHostNet",
              w, "hostNetwork needs dnsPolicy: ClusterFirstWithHostNet")
        _, sa = one("ServiceAccount")
        if sa:
            cross(pod.get("serviceAccountName") == sa["metadata"]["name"], w,
                  "serviceAccountName does not name serviceaccount.yaml's ServiceAccount")
        containers = pod.get("containers", [])
        container = next((c for c in containers if c.get("name") == "llm-probe"), None)
        if cross(container is not None, w, "no container named llm-probe"):
            check_container(w, container, pod)
            ports = container.get("ports", [])
            if cross(len(ports) >= 1, w, "the container declares no port"):
                port_name, port_num = ports[0].get("name"), ports[0].get("containerPort")

    # ---- Service
    sf, svc = one("Service")
    if svc:
        w = f"deploy/kubernetes/{sf}"
        spec = svc.get("spec", {})
        cross(spec.get("clusterIP") == "None", w, "the Service must be headless (clusterIP: None)")
        cross(subset(spec.get("selector"), pod_labels), w,
              f"selector {spec.get('selector')} does not match the DaemonSet's pod labels")
        sports = spec.get("ports", [])
        cross(any(p.get("name") == "metrics" and p.get("port") == port_num
                  and p.get("targetPort") in (port_name, port_num) for p in sports), w,
              f"no port named metrics on {port_num} targeting the container port {port_name!r}")

    # ---- PodMonitor
    pf, pm = one("PodMonitor")
    if pm and isinstance(pm.get("spec"), dict):
        w = f"deploy/kubernetes/{pf}"
        spec = pm["spec"]
        cross(subset(spec.get("selector", {}).get("matchLabels"), pod_labels), w,
              "spec.selector.matchLabels does not match the DaemonSet's pod labels")
        names = (spec.get("namespaceSelector") or {}).get("matchNames")
        cross(names is None or NAMESPACE in names, w, f"namespaceSelector excludes {NAMESPACE}")
        eps = spec.get("podMetricsEndpoints") or []
        if cross(len(eps) >= 1, w, "no podMetricsEndpoints"):
            for ep in eps:
                cross(ep.get("port") == port_name, w,
                      f"endpoint port {ep.get('port')!r} != the container's port name {port_name!r}")
                cross(ep.get("path", "/metrics") == "/metrics", w, "endpoint path is not /metrics")
                cross(ep.get("interval") == "15s", w, "scrape interval is not 15s")
        # The alert rules look for up{job="..."}: the PodMonitor must produce that job name.
        jobs = rules_job_names()
        if jobs:
            jl = spec.get("jobLabel")
            job = pod_labels.get(jl) if jl else f"{pm['metadata'].get('namespace')}/{pm['metadata'].get('name')}"
            cross(job in jobs, w,
                  f"scraped as job {job!r} but the alert rules expect job {sorted(jobs)} "
                  "(set spec.jobLabel to a pod label with that value)")

    # ---- PrometheusRule == deploy/prometheus/llm-probe-rules.yml
    rf, pr = one("PrometheusRule")
    if pr and isinstance(pr.get("spec"), dict):
        check_prometheusrule(f"deploy/kubernetes/{rf}", pr)


def check_container(w, c, pod):
    args = [str(a) for a in c.get("args", [])]
    cross(args[:1] == ["run"], w, f"container args must start with `run`, got {args[:1]}")
    cross("--port" in args or "--pid" in args, w, "args name neither --port nor --pid")
    listen = args[args.index("--listen") + 1] if "--listen" in args[:-1] else None
    ports = c.get("ports", [])
    cport = ports[0].get("containerPort") if ports else None
    cross(listen == f"0.0.0.0:{cport}", w,
          f"--listen must be 0.0.0.0:{cport} (the containerPort), got {listen}")
    sc = c.get("securityContext", {})
    caps = sc.get("capabilities", {})
    cross(sc.get("privileged") is False, w, "securityContext.privileged must be false")
    cross(sc.get("readOnlyRootFilesystem") is True, w, "readOnlyRootFilesystem must be true")
    cross(sc.get("allowPrivilegeEscalation") is False, w, "allowPrivilegeEscalation must be false")
    cross(caps.get("drop") == ["ALL"], w, "capabilities.drop must be [ALL]")
    cross(set(caps.get("add", [])) == CAPS, w,
          f"capabilities.add must be exactly {sorted(CAPS)}, got {caps.get('add')}")
    lim = c.get("resources", {}).get("limits", {})
    cross("memory" in lim, w, "no memory limit")
    for probe in ("readinessProbe", "livenessProbe"):
        p = c.get(probe)
        if not cross(isinstance(p, dict), w, f"no {probe}"):
            continue
        path = (p.get("httpGet") or {}).get("path")
        cross(path != "/health", w,
              f"{probe} must not use /health (503 when the engine, not the probe, is critical)")
    mounts = {m.get("mountPath"): m for m in c.get("volumeMounts", [])}
    vols = {v.get("name"): v for v in pod.get("volumes", [])}
    for path in ("/sys/kernel/btf", "/sys/kernel/tracing"):
        m = mounts.get(path)
        if cross(m is not None, w, f"{path} is not mounted"):
            cross(m.get("readOnly") is True, w, f"{path} must be mounted readOnly")
            v = vols.get(m.get("name"), {})
            cross((v.get("hostPath") or {}).get("path") == path, w,
                  f"{path} must come from hostPath {path}")


def first_difference(a, b, path="groups"):
    if type(a) is not type(b):
        return f"{path}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, dict):
        for k in list(a) + [k for k in b if k not in a]:
            if k not in a or k not in b:
                return f"{path}.{k}: only in {'the rule file' if k in b else 'prometheusrule.yaml'}"
            d = first_difference(a[k], b[k], f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list):
        for i, (x, y) in enumerate(zip(a, b)):
            label = y.get("alert") or y.get("record") or y.get("name") if isinstance(y, dict) else None
            d = first_difference(x, y, f"{path}[{i}{'=' + label if label else ''}]")
            if d:
                return d
        if len(a) != len(b):
            return f"{path}: {len(a)} item(s) in prometheusrule.yaml vs {len(b)} in the rule file"
        return None
    return None if a == b else f"{path}: differs"


def check_prometheusrule(w, pr):
    groups = pr["spec"].get("groups")
    if not cross(isinstance(groups, list) and groups, w, "spec.groups missing or empty"):
        return
    for g in groups:
        cross(isinstance(g, dict) and g.get("name") and isinstance(g.get("rules"), list), w,
              "a group lacks name or rules")
        for r in (g.get("rules") or []) if isinstance(g, dict) else []:
            cross(isinstance(r, dict) and "expr" in r and ("alert" in r) != ("record" in r), w,
                  f"rule {r!r:.60} needs expr and exactly one of alert/record")
    if not os.path.exists(RULES):
        fail(w, f"{rel(RULES)} does not exist, so spec.groups cannot be checked against it")
        return
    try:
        source = make_prometheusrule.load_groups(RULES)
    except (ValueError, yaml.YAMLError) as e:
        fail(rel(RULES), str(e))
        return
    if groups != source:
        fail(w, f"spec.groups differs from {rel(RULES)} ({first_difference(groups, source)}); "
                f"regenerate: {REGEN}")
    else:
        counts["cross"] += 1
    # Generated text exactly as the generator writes it (header included): catches hand edits.
    want = make_prometheusrule.render(source)
    have = open(make_prometheusrule.OUTPUT, encoding="utf-8").read()
    if groups == source and have != want:
        fail(w, f"not byte-identical to the generator's output (hand-edited?); regenerate: {REGEN}")


# --------------------------------------------------------------------------------- systemd
def parse_unit(path):
    """systemd unit syntax: [Section], Key=Value (repeatable), # and ; comments, \\ continuation."""
    sections, cur, pending = {}, None, ""
    with open(path, encoding="utf-8") as f:
        for n, raw in enumerate(f, 1):
            line = raw.rstrip("\n")
            if pending:
                line = pending + " " + line.strip()
                pending = ""
            s = line.strip()
            if not s or s[0] in "#;":
                continue
            if s.endswith("\\"):
                pending = s[:-1].rstrip()
                continue
            if s.startswith("["):
                if not s.endswith("]"):
                    raise ValueError(f"line {n}: bad section header {s!r}")
                cur = s[1:-1]
                sections.setdefault(cur, [])
                continue
            if cur is None:
                raise ValueError(f"line {n}: assignment outside a section")
            if "=" not in s:
                raise ValueError(f"line {n}: not Key=Value: {s!r}")
            k, v = s.split("=", 1)
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", k.strip()):
                raise ValueError(f"line {n}: bad key {k!r}")
            sections[cur].append((k.strip(), v.strip()))
    return sections


def check_unit():
    w = rel(UNIT)
    try:
        sections = parse_unit(UNIT)
    except (OSError, ValueError) as e:
        fail(w, str(e))
        return
    for sec in ("Unit", "Service", "Install"):
        if sec not in sections:
            fail(w, f"no [{sec}] section")
    svc = {}
    for k, v in sections.get("Service", []):
        svc.setdefault(k, []).append(v)
    last = lambda k: svc.get(k, [None])[-1]  # noqa: E731

    def req(ok, msg):
        counts["unit"] += 1
        if not ok:
            fail(w, msg)

    exec_start = last("ExecStart") or ""
    req(exec_start.startswith("/usr/local/bin/llm-probe run"),
        f"ExecStart must run /usr/local/bin/llm-probe run ..., got {exec_start!r}")
    # The default arguments, after $LLM_PROBE_ARGS expansion.
    env = {}
    for e in svc.get("Environment", []):
        for word in shlex.split(e):  # systemd's quoting is close enough to the shell's here
            key, _, val = word.partition("=")
            env[key] = val
    expanded = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), ""), exec_start)
    req(re.search(r"--(port|pid) \d+", expanded) is not None,
        f"default command line names no --port/--pid: {expanded!r}")
    req(re.search(r"--listen 127\.0\.0\.1:9464\b", expanded) is not None,
        f"default command line should --listen 127.0.0.1:9464: {expanded!r}")
    req(last("Restart") == "on-failure", "Restart must be on-failure")
    for key in ("CapabilityBoundingSet", "AmbientCapabilities"):
        got = set(" ".join(svc.get(key, [])).split())
        req(got == {"CAP_" + c for c in CAPS}, f"{key} must be exactly the four capabilities, got {sorted(got)}")
    req(last("NoNewPrivileges") == "yes", "NoNewPrivileges must be yes")
    req(last("ProtectSystem") == "strict", "ProtectSystem must be strict")
    req(last("ProtectHome") in ("yes", "read-only", "tmpfs"), "ProtectHome must be set")
    req(last("PrivateTmp") == "yes", "PrivateTmp must be yes")
    req(any(e.endswith("/etc/default/llm-probe") for e in svc.get("EnvironmentFile", [])),
        "EnvironmentFile=-/etc/default/llm-probe missing")
    # Hardening that would blind the probe (see the unit's comments).
    breaking = {
        "ProtectProc": {"invisible", "noaccess"},
        "ProcSubset": {"pid"},
        "PrivateDevices": {"yes", "true", "1", "on"},
        "ProtectClock": {"yes", "true", "1", "on"},
        "PrivateNetwork": {"yes", "true", "1", "on"},
        "PrivateUsers": {"yes", "true", "1", "on", "self", "identity"},
        "DevicePolicy": {"closed", "strict"},
    }
    for key, bad in breaking.items():
        req(last(key) not in bad, f"{key}={last(key)} would break the probe (NVML, /proc or BPF)")
    filt = " ".join(svc.get("SystemCallFilter", []))
    req(not filt or filt.startswith("~") or {"bpf", "perf_event_open"} <= set(filt.split())
        or "@privileged" in filt, "SystemCallFilter must allow bpf and perf_event_open")

    analyze = shutil.which("systemd-analyze")
    if not analyze:
        notes.append("systemd-analyze not found: unit checked by the built-in parser only")
        return
    # verify insists that ExecStart's binary exists: point it at a stub with the same arguments.
    with tempfile.TemporaryDirectory() as tmp:
        stub = os.path.join(tmp, "llm-probe")
        with open(stub, "w") as f:
            f.write("#!/bin/sh\nexit 0\n")
        os.chmod(stub, 0o755)
        text = open(UNIT, encoding="utf-8").read().replace("/usr/local/bin/llm-probe", stub)
        unit = os.path.join(tmp, "llm-probe.service")
        with open(unit, "w", encoding="utf-8") as f:
            f.write(text)
        try:
            r = subprocess.run([analyze, "verify", "--man=no", unit], capture_output=True,
                               text=True, timeout=60)
        except subprocess.TimeoutExpired:
            fail(w, "systemd-analyze verify timed out")
            return
    out = (r.stdout + r.stderr).replace(unit, w).replace(stub, "/usr/local/bin/llm-probe").strip()
    counts["unit"] += 1
    # Any message is a problem: verify exits 0 even for unknown keys or unparsable values.
    if r.returncode != 0 or out:
        fail(w, f"systemd-analyze verify (rc {r.returncode}): {out}")
    else:
        notes.append("systemd-analyze verify: clean")


# --------------------------------------------------------------------------------- docs
FLEET_TEST = os.path.join(HERE, "fleet_rules_test.yml")


def test_fleet_rules(w, promtool, block, i):
    """promtool test rules tests/deploy/fleet_rules_test.yml against the doc's rules block."""
    if "fleet:" not in block:
        return
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "rules.yml"), "w", encoding="utf-8") as f:
            f.write(block)
        test = os.path.join(tmp, "fleet_rules_test.yml")
        shutil.copy(FLEET_TEST, test)
        r = subprocess.run([promtool, "test", "rules", test], capture_output=True, text=True,
                           timeout=60, cwd=tmp)
    counts["doc"] += 1
    if r.returncode != 0:
        fail(w, f"promtool test rules {rel(FLEET_TEST)} on yaml block {i}: "
                f"{(r.stdout + r.stderr).strip()}")


def check_scaling_doc():
    """docs/scaling.md's YAML blocks parse; rule groups and prometheus.yml snippets pass promtool."""
    w = rel(SCALING)
    try:
        text = open(SCALING, encoding="utf-8").read()
    except OSError as e:
        fail(w, str(e))
        return
    blocks = re.findall(r"^```yaml\n(.*?)^```", text, flags=re.S | re.M)
    if not blocks:
        fail(w, "no ```yaml blocks (recording rules, remote_write, federation) found")
        return
    promtool = shutil.which("promtool")
    rules_seen = config_seen = 0
    for i, block in enumerate(blocks, 1):
        try:
            doc = yaml.safe_load(block)
        except yaml.YAMLError as e:
            fail(w, f"yaml block {i} does not parse: {e}")
            continue
        counts["doc"] += 1
        if not isinstance(doc, dict):
            continue
        if "groups" in doc:
            kind, args = "rules", ["check", "rules"]
            rules_seen += 1
            if promtool:
                test_fleet_rules(w, promtool, block, i)
        elif {"global", "scrape_configs", "remote_write"} & set(doc):
            kind, args = "config", ["check", "config", "--syntax-only"]
            config_seen += 1
        else:
            continue
        if not promtool:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"block{i}.yml")
            with open(path, "w", encoding="utf-8") as f:
                f.write(block)
            r = subprocess.run([promtool, *args, path], capture_output=True, text=True, timeout=60)
            if r.returncode != 0 and "--syntax-only" in args and "syntax-only" in r.stderr:
                # promtool older than 2.31 has no --syntax-only
                args.remove("--syntax-only")
                r = subprocess.run([promtool, *args, path], capture_output=True, text=True,
                                   timeout=60)
        counts["doc"] += 1
        if r.returncode != 0:
            out = (r.stdout + r.stderr).replace(path, f"block {i}").strip()
            fail(w, f"promtool check {kind} on yaml block {i}: {out}")
    if not rules_seen:
        fail(w, "no recording-rule block (a yaml block with `groups:`)")
    if not config_seen:
        fail(w, "no prometheus.yml block (remote_write / federation)")
    # The cardinality table is tests/deploy/cardinality.py's output, verbatim.
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        cardinality.main()
    counts["doc"] += 1
    if buf.getvalue() not in text:
        fail(w, "the series-count table differs from `python3 tests/deploy/cardinality.py`; paste its "
                "output into docs/scaling.md (and update the prose numbers)")
    if not promtool:
        notes.append("promtool not found: docs/scaling.md YAML parsed but not checked by promtool")
    else:
        notes.append(f"promtool: docs/scaling.md {rules_seen} rule block(s), "
                     f"{config_seen} config block(s) valid")


def main():
    check_kubernetes()
    check_unit()
    check_scaling_doc()
    for n in notes:
        print(f"note: {n}")
    for e in errors:
        print(f"FAIL {e}")
    summary = (f"{counts['objects']} objects ({counts['schema']} schema-validated against "
               f"Kubernetes {K8S_VERSION}, {counts['crd']} CRD objects structurally), "
               f"{counts['cross']} cross-checks, {counts['unit']} unit checks, {counts['doc']} doc checks")
    if errors:
        print(f"check_deploy: FAILED, {len(errors)} problem(s); {summary}")
        return 1
    print(f"check_deploy: OK, {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
