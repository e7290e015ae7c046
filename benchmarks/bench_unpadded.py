"""CPU: forward + backward of one training step's texts, mnr's Encoder (padded, length buckets) vs the unpadded
forward (mnr.unpadded), all-MiniLM-L6-v2, the same SNLI batches for every variant, alternated round by round.

A step: batch-size anchors + positives (right-padded to the longest, as mnr's collator does), embeddings, the MNR
loss, backward.  The padded variants run on transformers' sdpa attention, the unpadded one on mnr_varlen (its CPU
reference: each segment re-padded inside attention only; the linear layers see the real tokens alone).  flatten
is timed with the unpadded step.

    HF_HUB_OFFLINE=1 python benchmarks/bench_unpadded.py | tee benchmarks/results/<date>-cpu-unpadded.txt
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=32, help="pairs per step (2x texts)")
    p.add_argument("--steps", type=int, default=8, help="timed steps per variant and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--workdir", default="")
    args = p.parse_args()
    import torch

    from mnr.loss import mnr_loss, split_roles
    from mnr.model import load_encoder
    from mnr.unpadded import flatten, prepare_unpadded, unpadded_embed

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    work = common.work_dir(args.workdir, "mnr-unpadded-")
    data = work / "pairs.tsv"
    common.write_examples(data, hard_negatives=False)
    with open(data, encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    encoder, tokenizer = load_encoder(common.minilm_path())
    n_batches = args.warmup + args.steps
    batches = []
    for b in range(n_batches):
        part = rows[b * args.batch_size:(b + 1) * args.batch_size]
        enc = tokenizer([r[0] for r in part] + [r[1] for r in part], padding=True, truncation=True, max_length=128,
                        return_tensors="pt")
        batches.append((enc["input_ids"], enc["attention_mask"]))
    real = sum(int(m.sum()) for _, m in batches[args.warmup:])
    padded = sum(m.numel() for _, m in batches[args.warmup:])

    def loss_of(embeddings):
        return mnr_loss(*split_roles(embeddings, 2))

    def padded_step(buckets):
        def step(ids, mask):
            encoder.length_buckets = buckets
            loss_of(encoder(ids, mask)).backward()
        return step

    def unpadded_step(ids, mask):
        loss_of(unpadded_embed(encoder.transformer, flatten(ids, mask), encoder.pipeline.pooling)).backward()

    variants = {"padded, 1 bucket": ("sdpa", padded_step(1)), "padded, 4 buckets (default)": ("sdpa", padded_step(4)),
                "unpadded": (None, unpadded_step)}

    # the same embeddings first (fp32, dropout off), so the timing compares equal work
    ids, mask = batches[0]
    encoder.transformer.set_attn_implementation("sdpa")
    encoder.eval()
    with torch.no_grad():
        ref = encoder(ids, mask)
        prepare_unpadded(encoder.transformer)
        got = unpadded_embed(encoder.transformer, flatten(ids, mask), encoder.pipeline.pooling)
        diff = float((got - ref).abs().max())
    encoder.train()  # the timed steps are training steps: dropout on, as in a run

    load = os.getloadavg()
    print(f"machine: {common.machine()}; load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          f"(other processes share the cores)\nall-MiniLM-L6-v2, fp32, {args.batch_size} pairs = "
          f"{2 * args.batch_size} texts per step, {args.steps} timed steps (+{args.warmup} warm-up) per variant and "
          f"round, {args.rounds} rounds alternated; {real} real of {padded} padded tokens in the timed batches "
          f"({real / padded:.0%}); max |unpadded - padded| embedding difference {diff:.1e}", flush=True)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for rnd in range(args.rounds):
        for name, (impl, step) in variants.items():
            if impl is None:
                prepare_unpadded(encoder.transformer)
            else:
                encoder.transformer.set_attn_implementation(impl)
            for b, (ids, mask) in enumerate(batches):
                start = time.perf_counter()
                step(ids, mask)
                seconds = time.perf_counter() - start
                encoder.zero_grad(set_to_none=True)
                if b >= args.warmup:
                    times[name].append(seconds)
            rate = args.steps * args.batch_size / sum(times[name][-args.steps:])
            print(f"round {rnd} {name}: {rate:.1f} pairs/s", flush=True)
    base = statistics.median(times["padded, 4 buckets (default)"])
    print("\n| variant | ms per step (median) | pairs/s | vs 4 buckets | per round pairs/s |")
    print("|---|---:|---:|---:|---|")
    for name, ts in times.items():
        med = statistics.median(ts)
        rounds = [args.steps * args.batch_size / sum(ts[r * args.steps:(r + 1) * args.steps])
                  for r in range(args.rounds)]
        print(f"| {name} | {med * 1e3:.0f} | {args.batch_size / med:.1f} | {base / med:.2f}x | "
              f"{', '.join(f'{x:.1f}' for x in rounds)} |")
    load = os.getloadavg()
    print(f"\nload average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
