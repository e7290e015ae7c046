"""Quality: fine-tune all-MiniLM-L6-v2 on all SNLI entailment pairs of ../shared/data/nli with mnr and with
sentence-transformers (identical hyper-parameters and seed: batch 32, 1 epoch, lr 2e-5, 10% warm-up, scale 20,
weight decay 0.01, clip 1.0, max 128 tokens, seed 42), then score both output models with the same function
(mnr.evaluate.sts_spearman, STSb validation).  Prints one table; appends each finished run to --results.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python benchmarks/bench_quality.py            # pairs and triplets
    python benchmarks/bench_quality.py --variants pairs --trainers ours --ours-extra "--length-grouping 8"
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

HYPER = ["--epochs", "1", "--lr", "2e-5", "--warmup-ratio", "0.1", "--scale", "20", "--seed", "42",
         "--max-seq-length", "128"]


def score(model_dir: str) -> float:
    from mnr.backbone import Backbone
    from mnr.evaluate import load_sts, sts_spearman

    return sts_spearman(Backbone.load(model_dir), load_sts(str(common.STSB_VALIDATION)), 128)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="pairs,triplets", help="pairs (--no-hard-negatives) and/or triplets")
    p.add_argument("--trainers", default="ours,st")
    p.add_argument("--ours-extra", default="", help="extra train_mnr.py flags for our run (a speed lever)")
    p.add_argument("--ours-env", default="", help="extra environment for our run, e.g. ACCELERATE_MIXED_PRECISION=bf16")
    p.add_argument("--st-extra", default="", help="extra st_train.py flags, e.g. --bf16")
    p.add_argument("--workdir", default="", help="where data, models and logs go (default: a temp dir)")
    p.add_argument("--results", default="", help="append one JSON line per finished run here")
    args = p.parse_args()
    work = common.work_dir(args.workdir, "mnr-quality-")
    model = common.minilm_path()
    print(f"machine: {common.machine()}\nworkdir: {work}", flush=True)
    base = score(model)
    print(f"STSb validation Spearman of the base model: {base:.2f}", flush=True)
    env = dict(kv.split("=", 1) for kv in args.ours_env.split()) if args.ours_env else {}
    rows = []
    for variant in args.variants.split(","):
        data = work / f"{variant}.tsv"
        n = common.write_examples(data, hard_negatives=variant == "triplets")
        for trainer in args.trainers.split(","):
            out = work / f"{trainer}-{variant}"
            log = work / f"{trainer}-{variant}.log"
            if trainer == "ours":
                flags = HYPER + ["--hard-negatives" if variant == "triplets" else "--no-hard-negatives",
                                 "--eval-data", "none", "--log-steps", "50"] + shlex.split(args.ours_extra)
                cmd = common.ours_cmd(model, data, out, 32, extra=flags)
                rc, wall, rss = common.run_child(cmd, log, env)
            else:
                timings = work / f"st-{variant}-timings.json"
                cmd = common.st_cmd(model, data, out, 32, timings, extra=["--save"] + shlex.split(args.st_extra))
                rc, wall, rss = common.run_child(cmd, log)
            if rc != 0:
                raise SystemExit(f"{trainer} {variant} failed (exit {rc}); see {log}")
            after = score(str(out))
            row = {"trainer": trainer, "variant": variant, "examples": n, "stsb_before": base, "stsb_after": after,
                   "wall_s": wall, "peak_rss_mib": rss, "ours_extra": args.ours_extra if trainer == "ours" else "",
                   "ours_env": args.ours_env if trainer == "ours" else "",
                   "st_extra": args.st_extra if trainer == "st" else ""}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.results:
                with open(args.results, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
    print("\n| trainer | data | examples | STSb before | STSb after | change | wall s (incl. load) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        name = "mnr" + (f" {r['ours_extra']}" if r["ours_extra"] else "") + (f" [{r['ours_env']}]" if r["ours_env"] else "") \
            if r["trainer"] == "ours" else "sentence-transformers" + (f" {r['st_extra']}" if r["st_extra"] else "")
        print(f"| {name} | {r['variant']} | {r['examples']} | {r['stsb_before']:.2f} | {r['stsb_after']:.2f} | "
              f"{r['stsb_after'] - r['stsb_before']:+.2f} | {r['wall_s']:.0f} |")


if __name__ == "__main__":
    main()
