#!/usr/bin/env bash
# GPU check for the NVML sampler, run on a machine with an NVIDIA GPU (the `device` tool here):
# a PyTorch matmul loop keeps the GPU busy and holds memory; `llm-probe gpu` and `nvidia-smi
# --query-gpu` are read back to back, then `llm-probe run` is attached to the PyTorch process and
# its /metrics and /health are saved. Usage: tests/gpu/device_check.sh PATH/TO/llm-probe OUTDIR
set -u
BIN=$1
OUT=$2
mkdir -p "$OUT"
chmod +x "$BIN"
# Tracepoints need tracefs; some GPU hosts do not mount it.
[ -d /sys/kernel/tracing/events ] || mount -t tracefs nodev /sys/kernel/tracing 2>&1 | head -2
nvidia-smi -L | tee "$OUT/gpus.txt"
python3 - <<'PY' > "$OUT/torch.log" 2>&1 &
import time, torch
x = torch.randn(8192, 8192, device="cuda")
keep = torch.empty(6 * 1024**3, dtype=torch.uint8, device="cuda")  # 6 GiB held
print("reserved", torch.cuda.memory_reserved(), flush=True)
t = time.time()
while time.time() - t < 60:
    y = x @ x
    torch.cuda.synchronize()
PY
TORCH=$!
sleep 10
Q=index,uuid,pci.bus_id,name,utilization.gpu,memory.used,memory.total,temperature.gpu,power.draw,clocks.sm
for i in 1 2 3; do
  nvidia-smi --query-gpu=$Q --format=csv,noheader,nounits >> "$OUT/nvidia-smi.csv"
  "$BIN" gpu > "$OUT/llm-probe-gpu-$i.json" 2>> "$OUT/llm-probe-gpu.err"
  nvidia-smi --query-gpu=$Q --format=csv,noheader,nounits >> "$OUT/nvidia-smi.csv"
done
nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits > "$OUT/apps.csv"
echo "torch pid $TORCH" >> "$OUT/apps.csv"
RUST_LOG=info "$BIN" run --pid "$TORCH" --listen 127.0.0.1:9464 --nvml-interval 1s > "$OUT/run.log" 2>&1 &
PROBE=$!
sleep 8
python3 - "$OUT" <<'PY'
import sys, urllib.request
out = sys.argv[1]
for path, name in (("/metrics", "metrics.txt"), ("/health", "health.json")):
    try:
        body = urllib.request.urlopen("http://127.0.0.1:9464" + path, timeout=5).read().decode()
    except Exception as e:  # 503 when critical still has a body
        body = getattr(e, "read", lambda: str(e).encode())().decode()
    open(f"{out}/{name}", "w").write(body)
PY
nvidia-smi --query-gpu=$Q --format=csv,noheader,nounits >> "$OUT/nvidia-smi-during-run.csv"
grep -E '^llm_gpu|llm_probe_attached' "$OUT/metrics.txt" | head -40
kill -INT $PROBE; kill $TORCH; wait
# At most 8 files come back from the device tool: fold the small ones into one report.
for f in gpus.txt apps.csv nvidia-smi.csv nvidia-smi-during-run.csv torch.log run.log llm-probe-gpu.err; do
  echo "=== $f"; cat "$OUT/$f" 2>/dev/null
done > "$OUT/report.txt"
rm -f "$OUT"/gpus.txt "$OUT"/apps.csv "$OUT"/nvidia-smi*.csv "$OUT"/torch.log "$OUT"/run.log "$OUT"/llm-probe-gpu.err "$OUT"/llm-probe-gpu-2.json
echo done
