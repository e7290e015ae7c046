"""GradCache memory and speed: peak memory and steps/s of one training step, with and without --mini-batch-size.

    python benchmarks/bench_gradcache.py                  # batches 32, 256, 1024; GradCache chunks of 32
    python benchmarks/bench_gradcache.py --quick          # 1 timed step, no uncached batch 1024
    python benchmarks/bench_gradcache.py --triplets       # (anchor, entailment, contradiction) instead of pairs

Each configuration runs in a fresh subprocess (the offline all-MiniLM-L6-v2, real SNLI validation sentences
from ../shared/data/nli, one AdamW step = forward, MNR loss, backward, step), so peaks do not carry over.
Memory: on CUDA torch.cuda.max_memory_allocated; on the CPU the process's peak RSS (ru_maxrss), reported
whole and above the RSS after loading the model and data ("step peak") -- the part the batch size drives.
Not a test: numbers depend on the machine; see docs/gradcache_bench.md for a recorded run.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SNLI = REPO.parent / "shared" / "data" / "nli" / "snli_validation.tsv.gz"


def snli_examples(n: int, triplets: bool) -> list[tuple[str, ...]]:
    """n (premise, entailment[, contradiction]) with all texts distinct (no false negatives in the batch)."""
    by_premise: dict[str, dict[str, str]] = {}
    with gzip.open(SNLI, "rt", encoding="utf-8") as fh:
        for row in csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE):
            by_premise.setdefault(row["premise"], {}).setdefault(row["label"], row["hypothesis"])
    out, seen = [], set()
    for premise, hyp in by_premise.items():
        texts = (premise, hyp.get("entailment"), hyp.get("contradiction")) if triplets else \
            (premise, hyp.get("entailment"))
        if None in texts or seen.intersection(texts):
            continue
        seen.update(texts)
        out.append(texts)
        if len(out) == n:
            return out
    raise SystemExit(f"only {len(out)} usable SNLI examples in {SNLI}, need {n}")


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def one(batch: int, mini_batch: int, steps: int, triplets: bool, max_len: int) -> dict:
    """One configuration, in this (fresh) process."""
    import torch

    from mnr.gradcache import cached_loss_and_backward
    from mnr.loss import mnr_loss, split_roles
    from mnr.model import load_encoder

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_encoder("")  # the offline all-MiniLM-L6-v2
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5)
    examples = snli_examples(batch * (steps + 1), triplets)
    n_roles = len(examples[0])

    def loss_fn(embeddings):
        return mnr_loss(*split_roles(embeddings, n_roles))

    batches = []
    for i in range(steps + 1):
        rows = examples[i * batch:(i + 1) * batch]
        enc = tokenizer([r[k] for k in range(n_roles) for r in rows], padding=True, truncation=True,
                        max_length=max_len, return_tensors="pt")
        batches.append((enc["input_ids"].to(device), enc["attention_mask"].to(device)))
    base = rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20

    def step(ids, mask):
        if mini_batch:
            cached_loss_and_backward(model, ids, mask, mini_batch, loss_fn)
        else:
            loss_fn(model(ids, mask)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(*batches[0])  # warm-up (allocates the optimizer state too)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for ids, mask in batches[1:]:
        step(ids, mask)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else rss_mb()
    return {"batch": batch, "mini_batch": mini_batch, "device": device.type, "steps_per_s": steps / elapsed,
            "peak_mb": peak, "step_peak_mb": peak - base, "seq_len": int(batches[0][0].shape[1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="32,256,1024")
    parser.add_argument("--mini-batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--max-seq-length", type=int, default=64)
    parser.add_argument("--triplets", action="store_true")
    parser.add_argument("--quick", action="store_true", help="1 timed step; skip uncached batches above 256")
    parser.add_argument("--one", nargs=2, type=int, metavar=("BATCH", "MINI"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not SNLI.is_file():
        print(f"skipped: {SNLI} is not present")
        return
    if args.one:
        print(json.dumps(one(*args.one, args.steps, args.triplets, args.max_seq_length)))
        return
    steps = 1 if args.quick else args.steps
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for mini in (0, args.mini_batch_size):
            if mini >= batch or (args.quick and not mini and batch > 256):
                continue
            cmd = [sys.executable, __file__, "--one", str(batch), str(mini), "--steps", str(steps),
                   "--max-seq-length", str(args.max_seq_length)] + (["--triplets"] if args.triplets else [])
            env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
            if proc.returncode:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"  done: batch {batch}, mini-batch {mini or '-'}", file=sys.stderr, flush=True)
    uncached = {r["batch"]: r["steps_per_s"] for r in rows if not r["mini_batch"]}
    smallest = min(rows, key=lambda r: r["batch"])
    unit = "MiB (CUDA allocated)" if rows[0]["device"] == "cuda" else "MiB (peak RSS)"
    print(f"device: {rows[0]['device']}; {'triplets' if args.triplets else 'pairs'}; timed steps: {steps}; "
          f"max_seq_length {args.max_seq_length}; memory in {unit}")
    print("| batch | mini-batch | steps/s | vs uncached | peak | step peak | step peak / batch-32 uncached |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        rel = f"{r['steps_per_s'] / uncached[r['batch']]:.2f}x" if r["mini_batch"] and r["batch"] in uncached else "-"
        print(f"| {r['batch']} | {r['mini_batch'] or '-'} | {r['steps_per_s']:.3f} | {rel} | {r['peak_mb']:.0f} | "
              f"{r['step_peak_mb']:.0f} | {r['step_peak_mb'] / smallest['step_peak_mb']:.2f} |")


if __name__ == "__main__":
    main()
