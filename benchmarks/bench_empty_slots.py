"""Empty negative slots, embedded or not: one training step (forward, loss, backward, AdamW) of all-MiniLM-L6-v2
on the same real SNLI batches with every contradiction of a premise as a negative (`--negatives-per-query all`),
alternated A, B, A, B, ...:

  A. every slot embedded (an empty slot holds its positive's text and is masked out of the loss: before);
  B. empty slots not embedded (`row_index`: the loss reads the positive's row; what the collator does now).

Both compute the same loss (the empty slots are no candidates).  Prints the rows each forward runs on and the
pairs per second of each round.

    HF_HUB_OFFLINE=1 python benchmarks/bench_empty_slots.py --steps 8 --rounds 3
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
from mnr import batching  # noqa: E402
from mnr.batching import Collator, GlobalBatchSampler  # noqa: E402
from mnr.loss import mnr_loss, split_roles  # noqa: E402
from mnr.model import load_encoder  # noqa: E402
from mnr.store import prepare_train_store  # noqa: E402
from mnr.train import param_groups  # noqa: E402


def batches(data, tokenizer, batch_size: int, n: int, embed_empty: bool) -> list[dict]:
    real = batching._without_empty_slots
    if embed_empty:
        batching._without_empty_slots = lambda rows, valid: (rows, None)
    try:
        collator = Collator(data.token_ids, data.text_ids, tokenizer.pad_token_id, data.max_negatives, True)
        sampler = GlobalBatchSampler(data.text_ids, batch_size, seed=0, lengths=data.lengths, length_grouping=8)
        return [collator(b) for b in sampler.local_batches(0)[:n]]
    finally:
        batching._without_empty_slots = real


def step(encoder, optimizer, batch: dict, n_roles: int) -> None:
    embeddings = encoder(batch["input_ids"], batch["attention_mask"])
    if "row_index" in batch:
        embeddings = embeddings[batch["row_index"]]
    roles = split_roles(embeddings, n_roles)
    loss = mnr_loss(roles[0], roles[1], roles[2:], negative_mask=batch["negative_mask"], scale=20.0)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(encoder.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8, help="timed steps per setting per round (after 2 warm-up)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mnr-empty-slots-"))
    encoder, tokenizer = load_encoder(common.minilm_path())
    files = [str(common.NLI_DIR / f) for f in common.NLI_FILES]
    data = prepare_train_store(files, tokenizer, 128, None, str(work / "cache"))
    n_roles = 2 + data.max_negatives
    settings = {name: batches(data, tokenizer, args.batch_size, 2 + args.steps, name == "A every slot embedded")
                for name in ("A every slot embedded", "B empty slots not embedded")}
    print(f"machine: {common.machine()}")
    print(f"{len(data)} examples, {data.max_negatives} negative slots each ({data.stats.summary()})")
    for name, bs in settings.items():
        rows = [b["input_ids"].shape[0] for b in bs[2:]]
        print(f"{name}: {statistics.mean(rows):.0f} rows per forward (of {n_roles * args.batch_size} role slots)")
    state = {k: v.clone() for k, v in encoder.state_dict().items()}
    times: dict[str, list[float]] = {name: [] for name in settings}
    for rnd in range(args.rounds):
        for name, bs in settings.items():
            encoder.load_state_dict(state)
            encoder.train()
            optimizer = torch.optim.AdamW(param_groups(encoder, 0.01), lr=2e-5)
            for i, batch in enumerate(bs):
                if i == 2:
                    t0 = time.perf_counter()
                step(encoder, optimizer, batch, n_roles)
            times[name].append(args.steps * args.batch_size / (time.perf_counter() - t0))
            print(f"round {rnd} {name}: {times[name][-1]:.1f} pairs/s", flush=True)
    base = statistics.median(times["A every slot embedded"])
    print("\n| setting | pairs/s per round | median | vs A |")
    print("|---|---|---:|---:|")
    for name, ts in times.items():
        print(f"| {name} | {', '.join(f'{t:.1f}' for t in ts)} | {statistics.median(ts):.1f} | "
              f"{statistics.median(ts) / base:.2f}x |")


if __name__ == "__main__":
    main()
