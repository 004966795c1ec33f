#!/usr/bin/env python3
"""Series count of one llm-probe (per node) and of a fleet, for docs/scaling.md.

    python3 tests/deploy/cardinality.py          # the tables in docs/scaling.md

Series per label set come from probe-user/src/metrics.rs (bucket lists), gpu.rs and engine.rs:
a histogram with B buckets is B + 1 (+Inf) + 2 (_sum, _count) series. Label sets only exist once
seen (families are created lazily), except the self-metrics, which are pre-created.
"""

TTFT = 15 + 3      # 15 buckets + +Inf + _sum + _count
TBT = 14 + 3
DURATION = 10 + 3
SELF = 25 + 1 + 1 + 4 + 8 + 1 + 1 + 1  # attached{program}: 24 tracepoints + nvml; events; seen;
#                                        lost{4 reasons}; parse_errors{8 kinds}; targets;
#                                        connections; build_info  (= 42, checked on a live probe)
GPU_FAMILIES = 12  # llm_gpu_* per device (process memory counted separately, per pid)
ENGINE_FAMILIES = 3  # kv cache, engine queue, engine batch (per worker)
SYNTHETIC = 5      # up, scrape_duration_seconds, scrape_samples_scraped,
#                    scrape_samples_post_metric_relabeling, scrape_series_added (per target)


def per_node(models, endpoints, statuses, error_types, gpus, gpu_pids, engines, workers_per_engine=1,
             preemption_reasons=1):
    me = models * endpoints
    rows = [
        ("llm_ttft_seconds", f"{models}×{endpoints} × {TTFT}", me * TTFT),
        ("llm_tbt_seconds", f"{models}×{endpoints} × {TBT}", me * TBT),
        ("llm_request_duration_seconds", f"{models}×{endpoints}×{statuses} × {DURATION}",
         me * statuses * DURATION),
        ("llm_requests_total", f"{models}×{endpoints}×{statuses}", me * statuses),
        ("llm_error_total", f"{models}×{endpoints}×{error_types}", me * error_types),
        ("llm_{generated,prompt}_tokens_total, llm_tokens_per_second", f"{models} × 3", models * 3),
        ("llm_queue_depth, llm_batch_size", "2", 2),
        ("llm_gpu_* (12 families)", f"{gpus} × {GPU_FAMILIES}", gpus * GPU_FAMILIES),
        ("llm_gpu_process_memory_used_bytes", f"{gpu_pids} pids", gpu_pids),
        ("llm_kv_cache_utilization, llm_engine_{queue_depth,batch_size}, llm_preemption_total",
         f"{engines}×{workers_per_engine} × ({ENGINE_FAMILIES}+{preemption_reasons})",
         engines * workers_per_engine * (ENGINE_FAMILIES + preemption_reasons)),
        ("llm_probe_engine_scrape_errors_total", f"{engines} urls", engines),
        ("llm_probe_* self-metrics", "25+1+1+4+8+1+1+1", SELF),
    ]
    exported = sum(r[2] for r in rows)
    return rows, exported, exported + SYNTHETIC


SCENARIOS = {
    "A: 1 model, TP=8 (1 engine/node)": dict(models=1, endpoints=2, statuses=4, error_types=3,
                                              gpus=8, gpu_pids=8, engines=1),
    "B: 2 models, 1 engine/GPU": dict(models=2, endpoints=2, statuses=4, error_types=3,
                                      gpus=8, gpu_pids=8, engines=8),
    "worst case (caps)": dict(models=34, endpoints=9, statuses=6, error_types=5,
                              gpus=8, gpu_pids=8, engines=8),
}
NODES = 125


def main():
    names = list(SCENARIOS)
    results = {n: per_node(**SCENARIOS[n]) for n in names}
    print("| family | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for i, (fam, _, _) in enumerate(results[names[0]][0]):
        cells = [f"{results[n][0][i][1]} = **{results[n][0][i][2]:,}**" for n in names]
        print(f"| {fam} | " + " | ".join(cells) + " |")
    print("| exported by one probe | " + " | ".join(f"**{results[n][1]:,}**" for n in names) + " |")
    print("| + 5 per-target series Prometheus adds | "
          + " | ".join(f"**{results[n][2]:,}**" for n in names) + " |")
    print(f"| × {NODES} nodes (1,000 GPUs) | "
          + " | ".join(f"**{results[n][2] * NODES:,}**" for n in names) + " |")
    print("| samples/s at a 15 s scrape interval | "
          + " | ".join(f"{results[n][2] * NODES / 15:,.0f}" for n in names) + " |")


if __name__ == "__main__":
    main()
