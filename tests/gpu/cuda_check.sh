#!/usr/bin/env bash
# GPU check for the CUDA uprobes (issue 3), run on a machine with an NVIDIA GPU (the `device`
# tool): (1) the cudarc workload (cuda/, binary llm-cuda-workload) under `llm-probe run` attached
# before it loads libcuda; (2) a PyTorch decoder generating tokens under the probe, with the
# caching allocator's defaults and with expandable_segments (VMM). Everything lands in OUTDIR.
# Usage: tests/gpu/cuda_check.sh PATH/TO/llm-probe PATH/TO/llm-cuda-workload OUTDIR
set -u
BIN=$1
WL=$2
OUT=$3
mkdir -p "$OUT"
chmod +x "$BIN" "$WL"
[ -d /sys/kernel/tracing/events ] || mount -t tracefs nodev /sys/kernel/tracing 2>&1 | head -2
R="$OUT/report.txt"
{ nvidia-smi -L; nvidia-smi --query-gpu=driver_version --format=csv,noheader; uname -r; } > "$R" 2>&1
NV=$(python3 -c 'import os, nvidia.cuda_nvrtc as m; print(os.path.join(list(m.__path__)[0], "lib"))' 2>/dev/null)
fetch() { python3 -c 'import sys,urllib.request;print(urllib.request.urlopen(sys.argv[1],timeout=10).read().decode())' "$1"; }

echo "=== 1. cudarc workload" >> "$R"
LD_LIBRARY_PATH=${NV}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} sh -c 'sleep 3; exec "$0" --hold-secs 8' "$WL" \
  > "$OUT/wl.json" 2> "$OUT/wl.err" &
W=$!
RUST_LOG=info,probe_user::cuda::uprobes=debug "$BIN" run --pid $W --listen 127.0.0.1:9464 --kv-pool-min-age 1s --leak-age 1s > "$OUT/run-wl.log" 2>&1 &
P=$!
for i in $(seq 1 100); do grep -q "^hold:" "$OUT/wl.err" 2>/dev/null && break; sleep 0.2; done
sleep 1.2
fetch http://127.0.0.1:9464/metrics > "$OUT/wl-metrics-hold.txt"
"$BIN" memleak --pid $W --older-than 0s --top 5 > "$OUT/wl-memleak.txt" 2>&1
"$BIN" memleak --pid $W --older-than 0s --json > "$OUT/wl-memleak.json" 2>&1
wait $W
sleep 1.5
fetch http://127.0.0.1:9464/metrics | grep -E '^llm_(cuda|engine|probe_cuda|gpu_memory|kv)' | grep -v _bucket > "$OUT/wl-metrics-end.txt"
kill -INT $P; wait $P
{ echo "--- workload stdout"; cat "$OUT/wl.json"; echo "--- workload stderr"; tail -20 "$OUT/wl.err";
  echo "--- probe log"; grep -v '^\s*;' "$OUT/run-wl.log" | head -80;
  echo "--- probe metrics at hold"; grep -E '^llm_(cuda|engine|probe_cuda|gpu_memory|kv)' "$OUT/wl-metrics-hold.txt" | grep -v _bucket; } >> "$R"

for CONF in "" "expandable_segments:True"; do
  echo "=== 2. PyTorch, PYTORCH_CUDA_ALLOC_CONF='$CONF'" >> "$R"
  PYTORCH_CUDA_ALLOC_CONF=$CONF python3 tests/gpu/torch_cuda_check.py http://127.0.0.1:9464 4 \
    > "$OUT/torch.json" 2> "$OUT/torch.err" &
  T=$!
  RUST_LOG=info,probe_user::cuda::uprobes=debug "$BIN" run --pid $T --listen 127.0.0.1:9464 --nvml-interval 1s > "$OUT/run-torch.log" 2>&1 &
  P=$!
  for i in $(seq 1 300); do [ -s "$OUT/torch.json" ] && break; kill -0 $T 2>/dev/null || break; sleep 0.2; done
  "$BIN" memleak --pid $T --older-than 0s --top 3 >> "$R" 2>&1
  wait $T
  kill -INT $P; wait $P
  { echo "--- torch"; cat "$OUT/torch.json"; tail -5 "$OUT/torch.err";
    echo "--- probe log"; grep -v '^\s*;' "$OUT/run-torch.log" | grep -iv "connection" | head -60; } >> "$R"
done
rm -f "$OUT/wl.err" "$OUT/wl.json" "$OUT/run-wl.log" "$OUT/torch.json" "$OUT/torch.err" "$OUT/run-torch.log" "$OUT/wl-metrics-hold.txt"
echo done
