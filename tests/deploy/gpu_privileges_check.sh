#!/usr/bin/env bash
# Check, on a machine with an NVIDIA GPU and root, that llm-probe works with exactly what
# deploy/kubernetes/daemonset.yaml and deploy/systemd/llm-probe.service give it:
#   1. root, only CAP_BPF CAP_PERFMON CAP_SYS_PTRACE CAP_DAC_READ_SEARCH (bounding + ambient),
#      no_new_privs, /sys + tracefs read-only, /proc/kallsyms hidden, /proc/sys read-only
#      (ProtectKernelTunables=yes / the DaemonSet's read-only mounts), in a 128 MiB memory cgroup
#   2. the same as uid 65534 with the four ambient capabilities (the unit's User= alternative)
# and reports, per case: programs attached, llm_gpu_* series (NVML), RSS, BPF map memory, and
# the memory cgroup's peak. Usage: tests/deploy/gpu_privileges_check.sh PATH/TO/llm-probe OUTDIR
set -u
BIN=$1
OUT=$2
mkdir -p "$OUT"
chmod +x "$BIN"
[ -d /sys/kernel/tracing/events ] || mount -t tracefs nodev /sys/kernel/tracing 2>&1 | head -2
nvidia-smi -L
uname -r; nproc
C=-all,+bpf,+perfmon,+sys_ptrace,+dac_read_search
sleep 120 &
TARGET=$!

run_case() { # name uid port
  local name=$1 uid=$2 port=$3
  local cg=/sys/fs/cgroup/llm-probe-check-$name
  # A 128 MiB memory cgroup like the DaemonSet's limit, where cgroup v2 with the memory
  # controller is available; otherwise the case runs without one.
  if [ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ] && grep -qw memory /sys/fs/cgroup/cgroup.subtree_control \
     && mkdir "$cg" 2>/dev/null; then
    echo 128M > "$cg/memory.max" || { rmdir "$cg"; cg=""; }
  else
    echo "(no cgroup v2 memory controller: no 128 MiB limit for $name)"; cg=""
  fi
  (
    [ -n "$cg" ] && echo $BASHPID > "$cg/cgroup.procs"
    exec unshare -m bash -c '
      mount --make-rprivate /
      mount --rbind /sys /sys && mount -o remount,bind,ro /sys
      mount -o remount,bind,ro /sys/kernel/tracing
      mount --bind /dev/null /proc/kallsyms
      mount --rbind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys
      exec setpriv --reuid='"$uid"' --regid='"$uid"' --clear-groups --bounding-set='"$C"' \
        --inh-caps='"$C"' --ambient-caps='"$C"' --no-new-privs \
        env RUST_LOG=info '"$BIN"' run --pid '"$TARGET"' --listen 127.0.0.1:'"$port"' --nvml-interval 1s'
  ) > "$OUT/$name.log" 2>&1 &
  local pid=$!
  sleep 6
  local probe
  probe=$(pgrep -P "$pid" -x llm-probe || echo "$pid")
  curl -s "127.0.0.1:$port/metrics" > "$OUT/$name.metrics"
  {
    echo "== $name (uid $uid)"
    echo "status: $(grep -E '^Cap(Eff|Bnd|Amb)|^NoNewPrivs|^Uid' /proc/$probe/status 2>/dev/null | tr -s '\t' ' ' | tr '\n' ';')"
    echo "programs attached: $(grep -E '^llm_probe_attached\{program="(sys|task|sched|inet|sk_|sock)' "$OUT/$name.metrics" | awk '{s+=$2} END {print s+0 "/" NR}')"
    echo "nvml: $(grep -E '^llm_probe_attached\{program="nvml"' "$OUT/$name.metrics" | awk '{print $2}')"
    echo "llm_gpu_* series: $(grep -c '^llm_gpu_' "$OUT/$name.metrics")"
    grep -E '^llm_gpu_(utilization|memory_total_bytes)' "$OUT/$name.metrics" | head -2
    echo "series total: $(grep -vc '^#' "$OUT/$name.metrics")"
    echo "rss: $(grep -E '^VmRSS|^VmHWM' /proc/$probe/status 2>/dev/null | tr -s ' \t' ' ' | tr '\n' ';')"
    echo "bpf map memlock MiB: $(grep -h memlock /proc/$probe/fdinfo/* 2>/dev/null | awk '{s+=$2} END {printf "%.1f", s/1048576}')"
    [ -n "$cg" ] && echo "memcg current/peak MiB: $(( $(cat $cg/memory.current) / 1048576 ))/$(( $(cat $cg/memory.peak 2>/dev/null || echo 0) / 1048576 )) (max 128M)"
    grep -iE 'warn|error' "$OUT/$name.log" | grep -v 'exited' | head -5
  } | tee -a "$OUT/summary.txt"
  kill -TERM "$probe" 2>/dev/null; sleep 1; kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  [ -n "$cg" ] && rmdir "$cg" 2>/dev/null
}

run_case root-4caps 0 19471
run_case nobody-ambient 65534 19472
kill $TARGET
echo done
