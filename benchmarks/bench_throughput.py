"""Throughput: mnr's trainer vs sentence-transformers' SentenceTransformerTrainer + MultipleNegativesRankingLoss
(NO_DUPLICATES batches) on the same model, pairs, batch size, sequence limit, precision and number of steps.

Each trainer runs as its own subprocess (so its peak RSS, from wait4, is its own), alternated A/B/A/B for
--rounds rounds.  Steady-state pairs/s counts only the steps after the first --skip (start-up, first
allocations).  Ours is timed by its own metrics.jsonl (--log-steps 1: pairs_per_s of every step), the
reference by a callback at the end of every optimizer step; both include data loading.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python benchmarks/bench_throughput.py
    python benchmarks/bench_throughput.py --trainers ours,unpadded,st    # + mnr's unpadded forward (MNR_UNPADDED=1)
    python benchmarks/bench_throughput.py --precision bf16 --ours-extra "--length-buckets 1"
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    p.add_argument("--skip", type=int, default=10, help="first steps left out of the steady-state rate")
    p.add_argument("--rounds", type=int, default=3, help="A/B pairs of runs")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: ACCELERATE_MIXED_PRECISION=bf16 for ours, --bf16 (Trainer autocast) for theirs")
    p.add_argument("--ours-extra", default="", help="extra train_mnr.py flags (a speed lever)")
    p.add_argument("--st-extra", default="", help="extra benchmarks/st_train.py flags")
    p.add_argument("--trainers", default="ours,st", help="order within a round: ours, unpadded (ours with "
                   "MNR_UNPADDED=1, through benchmarks/mnr_train.py), st")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for both trainers (0: torch's default); "
                   "1 is steadier when other processes share the cores")
    p.add_argument("--workdir", default="")
    p.add_argument("--json", default="", help="also write all runs here")
    args = p.parse_args()
    work = common.work_dir(args.workdir, "mnr-throughput-")
    model = common.minilm_path()
    data = work / "pairs.tsv"
    n = common.write_examples(data, hard_negatives=False)
    print(f"machine: {common.machine()}\n{n} SNLI entailment pairs, batch {args.batch_size}, {args.steps} steps "
          f"(first {args.skip} not counted), max 128 tokens, {args.precision}, threads {args.threads or 'default'}, workdir {work}", flush=True)
    ours_env = {"ACCELERATE_MIXED_PRECISION": "bf16"} if args.precision == "bf16" else {}
    thread_env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    ours_env.update(thread_env)
    st_extra = (["--bf16"] if args.precision == "bf16" else []) + shlex.split(args.st_extra)
    runs = []
    for rnd in range(args.rounds):
        row = {"round": rnd}
        for trainer in args.trainers.split(","):
            out, log = work / f"{trainer}-{rnd}", work / f"{trainer}-{rnd}.log"
            if trainer in ("ours", "unpadded"):
                cmd = common.ours_cmd(model, data, out, args.batch_size, args.steps,
                                      ["--no-hard-negatives", "--eval-data", "none", "--max-seq-length", "128"]
                                      + shlex.split(args.ours_extra))
                if trainer == "unpadded":
                    cmd[1] = str(Path(__file__).resolve().parent / "mnr_train.py")
                env = {**ours_env, "MNR_UNPADDED": str(int(trainer == "unpadded"))}
                rc, wall, rss = common.run_child(cmd, log, env)
                seconds = [s for _, s in common.ours_step_times(out / "metrics.jsonl")] if rc == 0 else []
            else:
                timings = work / f"st-{rnd}.json"
                cmd = common.st_cmd(model, data, out, args.batch_size, timings, args.steps, st_extra)
                rc, wall, rss = common.run_child(cmd, log, thread_env)
                seconds = json.loads(timings.read_text())["step_seconds"] if rc == 0 else []
            if rc != 0:
                raise SystemExit(f"{trainer} run {rnd} failed (exit {rc}); see {log}")
            pps = common.steady_pairs_per_s(seconds, args.batch_size, args.skip)
            row[trainer] = {"pairs_per_s": pps, "peak_rss_mib": rss, "wall_s": wall, "steps": len(seconds)}
            print(f"round {rnd} {trainer}: {pps:.1f} pairs/s, peak RSS {rss:.0f} MiB, wall {wall:.0f} s", flush=True)
        runs.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2))
    print(f"\nours: train_mnr.py {args.ours_extra or '(defaults)'}; theirs: SentenceTransformerTrainer "
          f"{' '.join(st_extra) or '(fp32)'}")
    mine = [t for t in args.trainers.split(",") if t != "st"]
    print("| round | " + " | ".join(f"{t} pairs/s" for t in mine) + " | ST pairs/s | "
          + " | ".join(f"{t} / ST" for t in mine) + " | " + " | ".join(f"{t} peak RSS MiB" for t in mine)
          + " | ST peak RSS MiB |")
    print("|---:|" + "---:|" * (3 * len(mine) + 2))
    for r in runs:
        s = r["st"]
        print(f"| {r['round']} | " + " | ".join(f"{r[t]['pairs_per_s']:.1f}" for t in mine)
              + f" | {s['pairs_per_s']:.1f} | "
              + " | ".join(f"{r[t]['pairs_per_s'] / s['pairs_per_s']:.2f}x" for t in mine) + " | "
              + " | ".join(f"{r[t]['peak_rss_mib']:.0f}" for t in mine) + f" | {s['peak_rss_mib']:.0f} |")
    med = {t: statistics.median(r[t]["pairs_per_s"] for r in runs) for t in mine + ["st"]}
    ratios = {t: statistics.median(r[t]["pairs_per_s"] / r["st"]["pairs_per_s"] for r in runs) for t in mine}
    print("| median | " + " | ".join(f"{med[t]:.1f}" for t in mine) + f" | {med['st']:.1f} | "
          + " | ".join(f"{ratios[t]:.2f}x" for t in mine) + " |" + " |" * (len(mine) + 1))


if __name__ == "__main__":
    main()
