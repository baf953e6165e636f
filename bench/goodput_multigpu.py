"""1P1D on two GPUs against two colocated replicas on the same two GPUs (GPU; JSON lines).

Disaggregated: a prefill worker on GPU 0, a decode worker on GPU 1, KV over CUDA IPC (NVLink), every prompt
prefilled remotely. Colocated: two decode workers, one a GPU, each prefilling its own prompts, behind the
same router. Same random-initialised Llama-3-8B-shaped model (bf16), same workloads (ShareGPT and
prefix-heavy, saved once and replayed, and long-3k8k: 3k-8k-token prompts with 200-token answers, generated
here), each layout swept over the same request rates; goodput is the highest rate at which >= 90% of requests
meet TTFT <= 1 s and TPOT <= 50 ms (DistServe's figure). The last lines hold the disaggregated layout's max
goodput against the colocated replicas', both measured in this run.

Every rate starts on a fresh cluster (workers and router started again), so no rate runs on prefix caches an
earlier rate warmed. Replaying other sessions at each rate would not do: a prefix-heavy workload shares its
system prompts across all its sessions, so no slice of it is cold once another slice ran, and the workers
offer no way to empty their caches. The workloads of one rate run one after another on that rate's cluster:
their prompts share no block (different text; the long prompts are random token ids), so each starts on caches
that have not seen its prompts. The warm-up before them sends random token ids, no block in common with any
workload. A start costs about a minute of set-up (weights drawn, CUDA graphs captured) a rate and layout.

Each rate runs for --duration seconds of arrivals (turns not started by then are dropped), the load generator
leaves queueing to the servers (no client-side cap worth the name), and a workload stops at the first rate that
misses the SLO. With four GPUs visible, --concurrent runs the two layouts side by side (GPUs 0-1 and 2-3),
each in its own process with its own router and load generator, so the sweep takes half the time.

--quick: a dry run of the whole procedure on CPU with the demo model: both layouts, rates 0.5 and 1 req/s,
tiny prefix and long-3k8k workloads (prompts cut to 150-300 tokens, 8-token answers), 2 s of arrivals a rate,
SLOs relaxed to TTFT 5 s and TPOT 0.5 s so both rates run.

Run: python -m bench.goodput_multigpu --workloads .gpu/sharegpt.jsonl,.gpu/prefix.jsonl,long-3k8k --rates 4,8,16,32
"""

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.cluster import LocalCluster
from bench.common import emit
from bench.disagg import dummy_model
from bench.engine_gpu import LLAMA3_8B
from bench.run import add_args, run_once
from bench.workloads import fixed, load, make

LAYOUTS = {  # name -> (prefill workers, decode workers, router flags)
    "disaggregated_1p1d": (1, 1, ("--local-prefill-tokens", "0")),
    "colocated_2x": (0, 2, ("--local-prefill-tokens", "1000000000", "--policy", "cache_aware")),
}


def workloads_from(a: argparse.Namespace) -> dict[str, list[dict]]:
    """name -> sessions: a saved file (FILE.jsonl) or a workload generated here (bench.workloads: prefix,
    long-3k8k, ...) with the demo tokenizer's vocabulary. --quick shrinks the generated ones."""
    out = {}
    for spec in a.workloads.split(","):
        if spec.endswith(".jsonl"):
            out[Path(spec).stem] = load(spec)
        elif a.quick:  # a few short sessions: a dry run, not a measurement
            out[spec] = make(spec, 24, a.seed, vocab=49152, system_words=40, answer_len=8, min_len=150,
                             max_len=300, input_len=64, output_len=8)
        else:
            out[spec] = make(spec, a.sessions, a.seed, vocab=49152)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer-dir", default=".gpu/tokenizer")
    ap.add_argument("--workloads", default=None,
                    help="comma-separated: saved workloads (.jsonl) or names generated here (prefix, long-3k8k, "
                         "fixed); --quick: prefix,long-3k8k, shrunk")
    ap.add_argument("--sessions", type=int, default=4000, help="sessions of a workload generated here")
    ap.add_argument("--seed", type=int, default=0, help="of the workloads generated here")
    ap.add_argument("--rates", default=None, help="default 4,8,16,24,32,48,64 (--quick: 0.5,1)")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals a rate")
    ap.add_argument("--kv-gib", type=int, default=0,
                    help="KV pool a worker; 0: what the worker sizes from its GPU's free memory, as deployed (two "
                         "workers sharing one GPU need a number)")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--attainment", type=float, default=0.9)
    ap.add_argument("--ttft-slo", type=float, default=None, help="seconds (default 1; --quick 5)")
    ap.add_argument("--tpot-slo", type=float, default=None, help="seconds per output token (default 0.05; --quick 0.5)")
    ap.add_argument("--load-procs", type=int, default=4, help="load-generator processes a layout")
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated: " + ", ".join(LAYOUTS))
    ap.add_argument("--gpus", default="0,1", help="the two GPUs a layout runs on")
    ap.add_argument("--concurrent", action="store_true",
                    help="both layouts at once, one process each, on GPUs 0-1 and 2-3 (four GPUs)")
    ap.add_argument("--quick", action="store_true",
                    help="a dry run of the whole procedure on CPU: the demo model, a few sessions, no GPUs")
    a = ap.parse_args()
    a.workloads = a.workloads or ("prefix,long-3k8k" if a.quick else None)
    a.rates = a.rates or ("0.5,1" if a.quick else "4,8,16,24,32,48,64")
    a.ttft_slo = a.ttft_slo or (5.0 if a.quick else 1.0)
    a.tpot_slo = a.tpot_slo or (0.5 if a.quick else 0.05)
    if not a.workloads:
        raise SystemExit("--workloads is required (or --quick)")
    if a.concurrent:
        concurrent(a)
        return
    if a.quick:
        from pdserve_cli.main import demo_model

        folder, gpus, kv = demo_model(), None, 64 << 20
        worker_args = ("--max-num-seqs", "8", "--threads", "1")
    else:
        # The demo tokenizer's vocabulary, so that every id it makes is a row of the embedding.
        folder = dummy_model(Path(a.tokenizer_dir), LLAMA3_8B | {"vocab_size": 49152})
        gpus, kv = [int(g) for g in a.gpus.split(",")], (a.kv_gib << 30) or None
        worker_args = ("--load-format", "dummy", "--dtype", "bfloat16", "--max-num-seqs", str(a.max_num_seqs))
    workloads = workloads_from(a)
    rates = sorted(float(r) for r in a.rates.split(","))
    goodput: dict[tuple[str, str], float] = {}
    for layout in a.layouts.split(","):
        prefill, decode, router_flags = LAYOUTS[layout]
        best = {name: 0.0 for name in workloads}
        failed: set[str] = set()
        for k, rate in enumerate(rates):
            if len(failed) == len(workloads):
                break  # rates only get harder
            # A fresh cluster a rate: no rate runs on caches an earlier one warmed (see the docstring).
            cluster = LocalCluster(str(folder), prefill=prefill, decode=decode, kv_cache_bytes=kv,
                                   worker_args=worker_args, start_timeout_s=900, gpus=gpus)
            try:
                url = cluster.start_router(*router_flags)
                ra = argparse.ArgumentParser()
                add_args(ra)
                run_args = ra.parse_args(["--url", url, "--label", layout, "--concurrency", "4096",
                                          "--procs", str(1 if a.quick else a.load_procs),
                                          "--duration", str(2.0 if a.quick else a.duration),
                                          "--ttft-slo", str(a.ttft_slo), "--tpot-slo", str(a.tpot_slo)])
                # Warm-up (kernels, allocator caches): random token ids, no block in common with any workload.
                run_once(run_args, None, fixed(2 if a.quick else 8, 64, 4, seed=10_000 + k, vocab=49152), out="")
                for name, sessions in workloads.items():
                    if name in failed:
                        continue
                    run_args.workload = name
                    before = host_counters(cluster)
                    row = run_once(run_args, rate, sessions)
                    emit("goodput_multigpu", "slo_attainment", row["slo_attainment"], "share", layout=layout,
                         workload=name, rate=rate, required=a.attainment, ttft_p90_ms=row.get("ttft_p90_ms"),
                         itl_p90_ms=row.get("itl_p90_ms"), req_per_s=row.get("req_per_s"),
                         requests=row.get("requests"), errors=row.get("errors"),
                         cache_hit_ratio=row.get("cache_hit_ratio"), fresh_cluster=True,
                         **host_use(before, host_counters(cluster)))
                    if row["slo_attainment"] >= a.attainment:
                        best[name] = rate
                    else:
                        failed.add(name)
            finally:
                cluster.close()
        for name, rate in best.items():
            goodput[(layout, name)] = rate
            emit("goodput_multigpu", f"layout_goodput_{name}", rate, "req/s", layout=layout, workload=name)
    if len(a.layouts.split(",")) == len(LAYOUTS):
        report(goodput, a)


def host_counters(cluster: LocalCluster) -> dict:
    return {"t": time.perf_counter(), "cpu": cluster.cpu_seconds(),
            "load": {u: cluster.load(u) for u in cluster.decode_urls}}


def host_use(before: dict, after: dict) -> dict:
    """Where the host time went during a rate: each process's CPU in cores (a Python process's GIL caps its
    event loop and engine thread together near 1), and each decode worker's steps/s and tokens a step."""
    dt = after["t"] - before["t"]
    cpu = {k: round((v - before["cpu"].get(k, 0.0)) / dt, 2) for k, v in after["cpu"].items()}
    steps = {}
    for i, (u, b) in enumerate(before["load"].items()):
        n = after["load"][u]["steps"] - b["steps"]
        toks = after["load"][u]["tokens_computed"] - b["tokens_computed"]
        steps[f"decode{i}"] = {"steps_per_s": round(n / dt, 1), "tokens_per_step": round(toks / max(n, 1), 1)}
    return {"cpu_cores": cpu, "decode_steps": steps}


def concurrent(a: argparse.Namespace) -> None:
    """Each layout in its own process on its own pair of GPUs; their rows pass through, the ratio comes last."""
    argv = [arg for arg in sys.argv[1:] if arg != "--concurrent"]
    procs = [subprocess.Popen([sys.executable, "-m", "bench.goodput_multigpu", *argv, "--layouts", layout,
                               "--gpus", f"{2 * i},{2 * i + 1}"], stdout=subprocess.PIPE, text=True)
             for i, layout in enumerate(LAYOUTS)]
    goodput: dict[tuple[str, str], float] = {}

    def relay(proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            print(line, end="", flush=True)
            row = json.loads(line) if line.startswith("{") else {}
            if row.get("metric", "").startswith("layout_goodput_"):
                goodput[(row["layout"], row["workload"])] = row["value"]

    threads = [threading.Thread(target=relay, args=(p,)) for p in procs]
    for t in threads:
        t.start()
    for t, proc in zip(threads, procs, strict=True):
        t.join()
        proc.wait()
    report(goodput, a)


def report(goodput: dict[tuple[str, str], float], a: argparse.Namespace) -> None:
    rates = sorted(float(r) for r in a.rates.split(","))
    for spec in a.workloads.split(","):
        name = Path(spec).stem
        d, c = goodput.get(("disaggregated_1p1d", name), 0.0), goodput.get(("colocated_2x", name), 0.0)
        # No ratio where the colocated replicas met the SLOs at no rate tried (baseline 0).
        emit("goodput_multigpu", f"max_goodput_{name}", d, "req/s", "2 colocated replicas, same GPUs", c,
             ttft_slo_s=a.ttft_slo, tpot_slo_s=a.tpot_slo, attainment=a.attainment,
             model="demo (cpu dry run)" if a.quick else "llama3-8b-shapes (random, bf16)", rates=rates)


if __name__ == "__main__":
    main()
