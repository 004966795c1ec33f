#!/usr/bin/env bash
# Eager PyTorch launch cost under llm-probe's two launch-probe modes (the `device` tool): rounds of
# (no probe, --cuda-launch-probes all, --cuda-launch-probes driver) on a 64x64 matmul+scale loop.
# Usage: tests/gpu/torch_launch_modes.sh PATH/TO/llm-probe OUTDIR
set -u
BIN=$1
OUT=$2
mkdir -p "$OUT"
chmod +x "$BIN"
[ -d /sys/kernel/tracing/events ] || mount -t tracefs nodev /sys/kernel/tracing 2>&1 | head -2
R="$OUT/modes.txt"
cat > "$OUT/ops.py" <<'PY'
import sys, time
time.sleep(float(sys.argv[1]))
import torch
time.sleep(float(sys.argv[1]) and 3)  # the probe attaches libcudart at its next maps rescan
x = torch.randn(64, 64, device="cuda")
for _ in range(200): x = x @ x * 0.01
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(20000): x = x @ x * 0.01
torch.cuda.synchronize()
print(round(40000 / (time.perf_counter() - t)))
PY
for round in 1 2 3; do
  base=$(python3 "$OUT/ops.py" 0 2>/dev/null | tail -1)
  line="round $round: none $base"
  for mode in all driver; do
    python3 "$OUT/ops.py" 5 > "$OUT/ops.txt" 2>/dev/null &
    T=$!
    "$BIN" run --pid $T --listen 127.0.0.1:9464 --cuda-launch-probes $mode > "$OUT/run.log" 2>&1 &
    P=$!
    wait $T
    line="$line, $mode $(tail -1 "$OUT/ops.txt")"
    kill -INT $P; wait $P
  done
  echo "$line ops/s" >> "$R"
done
rm -f "$OUT/ops.py" "$OUT/ops.txt" "$OUT/run.log"
cat "$R"
