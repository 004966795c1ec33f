"""PyTorch side of tests/gpu/cuda_check.sh: a small randomly initialised decoder generates tokens
while `llm-probe run` is attached to this process. Prints one JSON line comparing the probe's
CUDA metrics with PyTorch's own view: launches (torch.profiler's runtime/driver API events),
ledger live bytes vs torch.cuda.memory_reserved(), sync waits vs host-timed synchronize calls
(CUDA-event GPU times alongside). Usage: python3 torch_cuda_check.py PROBE_URL SLEEP_BEFORE_IMPORT
"""
import json
import os
import sys
import time
import urllib.request

url, pre = sys.argv[1], float(sys.argv[2])
time.sleep(pre)  # the probe attaches now, before libcudart/libcuda are loaded
import torch  # noqa: E402  (maps libcudart through libtorch_cuda's RUNPATH)

time.sleep(3)  # let the probe's maps rescan (every 2 s) attach libcudart before CUDA init
PID = str(os.getpid())


def metrics():
    body = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    out = {}
    for line in body.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        series, value = line.rsplit(" ", 1)
        out[series] = float(value)
    return out


def pick(m, name, **labels):
    s = 0.0
    for series, v in m.items():
        n, _, lbl = series.partition("{")
        if n == name and all(f'{k}="{val}"' in lbl for k, val in labels.items()):
            s += v
    return s


def by_api(m, name):
    out = {}
    for series, v in m.items():
        n, _, lbl = series.partition("{")
        if n == name and 'api="' in lbl:
            api = lbl.split('api="')[1].split('"')[0]
            out[api] = out.get(api, 0) + v
    return out


dev = torch.device("cuda")
torch.manual_seed(0)
V, D, L, H, B, T0, NEW = 4096, 512, 4, 8, 4, 32, 48


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(D), torch.nn.LayerNorm(D)
        self.qkv, self.o = torch.nn.Linear(D, 3 * D), torch.nn.Linear(D, D)
        self.ff = torch.nn.Sequential(torch.nn.Linear(D, 4 * D), torch.nn.GELU(), torch.nn.Linear(4 * D, D))

    def forward(self, x, cache):
        q, k, v = self.qkv(self.ln1(x)).chunk(3, -1)
        sh = lambda t: t.view(t.shape[0], t.shape[1], H, D // H).transpose(1, 2)
        q, k, v = sh(q), sh(k), sh(v)
        if cache:
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
        cache[:] = [k, v]
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1)
        x = x + self.o(a.transpose(1, 2).reshape(x.shape))
        return x + self.ff(self.ln2(x))


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(V, D)
        self.blocks = torch.nn.ModuleList(Block() for _ in range(L))
        self.head = torch.nn.Linear(D, V)

    def forward(self, ids, caches):
        x = self.emb(ids)
        for b, c in zip(self.blocks, caches):
            x = b(x, c)
        return self.head(x[:, -1])


model = Model().to(dev).eval()


def generate():
    caches = [[] for _ in range(L)]
    ids = torch.randint(0, V, (B, T0), device=dev)
    tok = model(ids, caches).argmax(-1, keepdim=True)  # prefill
    out = [tok.cpu()]  # .cpu() synchronises: the step boundary the probe sees
    for _ in range(NEW - 1):  # decode
        tok = model(tok, caches).argmax(-1, keepdim=True)
        out.append(tok.cpu())
    return out


with torch.no_grad():
    generate()  # warm-up (cuBLAS handles, allocator segments)
    torch.cuda.synchronize()
    before = metrics()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        generate()
        torch.cuda.synchronize()
    after_gen = metrics()
    api_counts = {}
    for e in prof.events():
        if e.name.startswith(("cudaLaunch", "cuLaunch", "cudaGraphLaunch", "cuGraphLaunch")):
            api_counts[e.name] = api_counts.get(e.name, 0) + 1
    # Sync waits: a known GPU load, then a host-timed synchronize; CUDA events time the GPU work.
    x = torch.randn(4096, 4096, device=dev)
    host_ns, gpu_ms = [], []
    s0 = metrics()
    for _ in range(20):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(8):
            y = x @ x
        e1.record()
        t = time.perf_counter_ns()
        torch.cuda.synchronize()
        host_ns.append(time.perf_counter_ns() - t)
        gpu_ms.append(e0.elapsed_time(e1))
    s1 = metrics()
    hold = [torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device=dev) for _ in range(3)]
    torch.cuda.synchronize()
    time.sleep(1.5)
    final = metrics()


def delta(a, b, name):
    da, db = by_api(a, name), by_api(b, name)
    return {k: db[k] - da.get(k, 0) for k in db if db[k] - da.get(k, 0)}


print(json.dumps({
    "torch": torch.__version__, "cuda": torch.version.cuda,
    "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
    "profiler_launch_events": api_counts,
    "probe_kernel_launches": delta(before, after_gen, "llm_cuda_kernel_launches_total"),
    "probe_graph_launches": delta(before, after_gen, "llm_cuda_graph_launches_total"),
    "probe_nested": delta(before, after_gen, "llm_probe_cuda_nested_calls_total"),
    "probe_nested_total": by_api(final, "llm_probe_cuda_nested_calls_total"),
    "probe_alloc_total": by_api(final, "llm_cuda_alloc_total"),
    "probe_free_total": by_api(final, "llm_cuda_free_total"),
    "sync_host_ns_sum": sum(host_ns), "sync_gpu_ms_sum": sum(gpu_ms),
    "probe_sync_count": {k: v for k, v in delta(s0, s1, "llm_cuda_sync_wait_seconds_count").items()},
    "probe_sync_sum_s": {k: v for k, v in delta(s0, s1, "llm_cuda_sync_wait_seconds_sum").items()},
    "memory_reserved": torch.cuda.memory_reserved(),
    "memory_allocated": torch.cuda.memory_allocated(),
    "probe_live_bytes": pick(final, "llm_gpu_memory_live_bytes", pid=PID),
    "probe_kv_pool_bytes": pick(final, "llm_kv_cache_pool_bytes", pid=PID),
    "probe_fragmentation": pick(final, "llm_gpu_memory_fragmentation_ratio", pid=PID),
    "probe_steps": {p: pick(final, "llm_engine_step_seconds_count", phase=p) for p in ("prefill", "decode")},
    "probe_unknown_frees": pick(final, "llm_probe_cuda_bad_frees_total", reason="unknown"),
    "pid": os.getpid(),
}), flush=True)
time.sleep(4)  # the shell asks `llm-probe memleak` about this process now
del hold
