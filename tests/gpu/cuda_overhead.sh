#!/usr/bin/env bash
# What the CUDA uprobes cost on a real driver (the `device` tool): host ns per cuLaunchKernel in the
# cudarc workload's --launch-bench loop, and eager PyTorch ops/s (each op: cudaLaunchKernel →
# cuLaunchKernel, two probe hits), alternating rounds without and with `llm-probe run` attached.
# Usage: tests/gpu/cuda_overhead.sh PATH/TO/llm-probe PATH/TO/llm-cuda-workload OUTDIR
set -u
BIN=$1
WL=$2
OUT=$3
mkdir -p "$OUT"
chmod +x "$BIN" "$WL"
[ -d /sys/kernel/tracing/events ] || mount -t tracefs nodev /sys/kernel/tracing 2>&1 | head -2
R="$OUT/overhead.txt"
NV=$(python3 -c 'import os, nvidia.cuda_nvrtc as m; print(os.path.join(list(m.__path__)[0], "lib"))' 2>/dev/null)
export LD_LIBRARY_PATH=${NV}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
WARGS="--launch-bench 20000 --prefill-bursts 1 --steps 2 --allocs 1 --leak-mib 8"
cat > "$OUT/ops.py" <<'PY'
import sys, time
time.sleep(float(sys.argv[1]))
import torch
time.sleep(3)  # the probe attaches libcudart at its next maps rescan (every 2 s)
x = torch.randn(64, 64, device="cuda")
for _ in range(200): x = x @ x * 0.01  # warm-up
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(20000): x = x @ x * 0.01
torch.cuda.synchronize()
print("torch ops/s", round(40000 / (time.perf_counter() - t)))
PY
probe() {  # probe PID: attach, wait until the libraries are attached
  RUST_LOG=info "$BIN" run --pid "$1" --listen 127.0.0.1:9464 >> "$OUT/run.log" 2>&1 &
  P=$!
}
for round in 1 2 3; do
  echo "round $round" >> "$R"
  sh -c 'sleep 2; exec "$0" '"$WARGS" "$WL" 2>/dev/null | python3 -c 'import sys,json; print("  base  launch ns", json.load(sys.stdin)["launch_bench_ns_per_call"])' >> "$R"
  sh -c 'sleep 2; exec "$0" '"$WARGS" "$WL" > "$OUT/wl.json" 2>/dev/null &
  W=$!; probe $W; wait $W
  python3 -c 'import sys,json; print("  probe launch ns", json.load(open(sys.argv[1]))["launch_bench_ns_per_call"])' "$OUT/wl.json" >> "$R"
  curl -s 127.0.0.1:9464/metrics 2>/dev/null | grep '^llm_cuda_kernel_launches_total' >> "$R" || \
    python3 -c 'import urllib.request as u;[print(l) for l in u.urlopen("http://127.0.0.1:9464/metrics").read().decode().splitlines() if l.startswith("llm_cuda_kernel_launches_total")]' >> "$R"
  kill -INT $P; wait $P
  echo "  base  $(python3 "$OUT/ops.py" 0 2>&1 | tail -1)" >> "$R"
  python3 "$OUT/ops.py" 6 > "$OUT/ops.txt" 2>&1 &
  T=$!; probe $T; wait $T
  echo "  probe $(tail -1 "$OUT/ops.txt")" >> "$R"
  kill -INT $P; wait $P
done
grep -E "CUDA:|WARN" "$OUT/run.log" | sort | uniq -c | head -20 >> "$R"
rm -f "$OUT/run.log" "$OUT/wl.json" "$OUT/ops.py" "$OUT/ops.txt"
cat "$R"
