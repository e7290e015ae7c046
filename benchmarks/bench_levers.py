"""Speed levers, in-process and alternated (A, B, C, A, B, C, ...): one training step (forward, loss,
backward, AdamW step) of all-MiniLM-L6-v2 on the same real SNLI batches (batch 32 pairs, our sampler), per
setting.  Also: the share of real (non-pad) tokens under each batching, which is what the levers buy.

    HF_HUB_OFFLINE=1 python benchmarks/bench_levers.py                   # all settings, 3 rounds
    python benchmarks/bench_levers.py --settings fp32,fp32-b4 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402
from mnr.batching import Collator, GlobalBatchSampler  # noqa: E402
from mnr.loss import mnr_loss, split_roles  # noqa: E402
from mnr.model import load_encoder  # noqa: E402
from mnr.store import prepare_train_store  # noqa: E402
from mnr.train import param_groups  # noqa: E402

# name -> (length_buckets, bf16 autocast, fused AdamW, length_grouping)
SETTINGS = {
    "fp32": (1, False, False, 0),
    "fp32-b2": (2, False, False, 0),
    "fp32-b4": (4, False, False, 0),
    "fp32-b8": (8, False, False, 0),
    "fp32-fused": (1, False, True, 0),
    "bf16": (1, True, False, 0),
    "bf16-b4": (4, True, False, 0),
    "fp32-b4-g8": (4, False, False, 8),
    "fp32-b4-g8-compile": (4, False, False, 8),  # + torch.compile(dynamic=True) of the transformer
}
COMPILED = {"fp32-b4-g8-compile"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--steps", type=int, default=8, help="timed steps per setting per round (after 2 warm-up)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default); 1 is steadier on a shared machine")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.settings.split(",")
    work = Path(tempfile.mkdtemp(prefix="mnr-levers-"))
    common.write_examples(work / "pairs.tsv", hard_negatives=False)
    encoder, tokenizer = load_encoder(common.minilm_path())
    data = prepare_train_store(str(work / "pairs.tsv"), tokenizer, 128, False, str(work / "cache"))
    lengths = data.lengths
    collator = Collator(data.token_ids, data.text_ids, tokenizer.pad_token_id)
    n = 2 + args.steps
    batches = {}
    for grouping in sorted({SETTINGS[s][3] for s in names}):
        sampler = GlobalBatchSampler(data.text_ids, args.batch_size, seed=0, lengths=lengths, length_grouping=grouping)
        batches[grouping] = [collator(b) for b in sampler.local_batches(0)[:n]]
    if args.threads:  # again: reading and tokenising the data (datasets) resets torch's thread count
        torch.set_num_threads(args.threads)
    print(f"machine: {common.machine()}")
    for grouping, bs in batches.items():
        real = sum(int(b["attention_mask"].sum()) for b in bs)
        for buckets in (1, 2, 4, 8):  # tokens the transformer runs on: each chunk padded to its own longest
            padded = 0
            for b in bs:
                lengths_b = b["attention_mask"].sum(dim=1).sort().values
                padded += sum(int(c.max()) * len(c) for c in lengths_b.chunk(buckets))
            print(f"length_grouping={grouping}, length_buckets={buckets}: real tokens are {real / padded:.0%} "
                  f"of the tokens computed")
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    eager = encoder.transformer
    compiled = torch.compile(eager, dynamic=True) if COMPILED & set(names) else None
    times: dict[str, list[float]] = {s: [] for s in names}
    for rnd in range(args.rounds):
        for name in names:
            buckets, bf16, fused, grouping = SETTINGS[name]
            encoder.transformer = eager  # the compiled wrapper shares eager's parameters
            encoder.load_state_dict(state)
            encoder.transformer = compiled if name in COMPILED else eager
            encoder.length_buckets = buckets
            encoder.train()
            optimizer = torch.optim.AdamW(param_groups(encoder, 0.01), lr=2e-5, fused=fused or None,
                                          foreach=None if fused else True)
            t_start = time.perf_counter()
            for i, batch in enumerate(batches[grouping]):
                if i == 2:
                    t0 = time.perf_counter()
                    if name in COMPILED:
                        print(f"  {name}: 2 warm-up steps (compilation included) took {t0 - t_start:.0f} s", flush=True)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    roles = split_roles(encoder(batch["input_ids"], batch["attention_mask"]), 2)
                    loss = mnr_loss(roles[0], roles[1], scale=20.0)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            pairs_s = args.steps * args.batch_size / (time.perf_counter() - t0)
            times[name].append(pairs_s)
            print(f"round {rnd} {name}: {pairs_s:.1f} pairs/s", flush=True)
    base = statistics.median(times[names[0]])
    print(f"\n| setting (buckets, bf16, fused AdamW, grouping) | pairs/s per round | median | vs {names[0]} |")
    print("|---|---|---:|---:|")
    for name in names:
        med = statistics.median(times[name])
        print(f"| {name} {SETTINGS[name]} | {', '.join(f'{t:.1f}' for t in times[name])} | {med:.1f} | "
              f"{med / base:.2f}x |")


if __name__ == "__main__":
    main()
