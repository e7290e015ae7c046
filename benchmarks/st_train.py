"""sentence-transformers' reference training run: SentenceTransformerTrainer + MultipleNegativesRankingLoss
with NO_DUPLICATES batches, timed per optimizer step by a callback.  Run by the benchmark scripts as a
subprocess (so its peak memory is its own); usable alone:

    python benchmarks/st_train.py --model DIR --data pairs.tsv --output-dir /tmp/st --max-steps 60 --timings t.json
"""

from __future__ import annotations

import argparse
import csv
import json
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True, help="TSV with anchor, positive[, negative] (benchmarks/common.py)")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-steps", type=int, default=-1)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.01, help="mnr's default, so both runs match")
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--scale", type=float, default=20.0)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max-seq-length", type=int, default=128)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (HF Trainer's --bf16)")
    p.add_argument("--cached-mini-batch-size", type=int, default=0,
                   help="CachedMultipleNegativesRankingLoss with this mini-batch (0: MultipleNegativesRankingLoss)")
    p.add_argument("--timings", default="", help="write per-step seconds as JSON here")
    p.add_argument("--save", action="store_true", help="save the trained model to --output-dir")
    args = p.parse_args()

    import datasets
    import torch
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import (CachedMultipleNegativesRankingLoss,
                                                                   MultipleNegativesRankingLoss)
    from sentence_transformers.sentence_transformer.training_args import BatchSamplers
    from transformers import TrainerCallback

    with open(args.data, encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    header, rows = rows[0], rows[1:]
    train = datasets.Dataset.from_dict({name: [r[i] for r in rows] for i, name in enumerate(header)})

    model = SentenceTransformer(args.model, device="cuda" if torch.cuda.is_available() else "cpu")
    model.max_seq_length = args.max_seq_length
    loss = (CachedMultipleNegativesRankingLoss(model, scale=args.scale, mini_batch_size=args.cached_mini_batch_size)
            if args.cached_mini_batch_size else MultipleNegativesRankingLoss(model, scale=args.scale))

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.start = 0.0

        def on_train_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.ends.append(time.perf_counter())

    timer = StepTimer()
    training_args = SentenceTransformerTrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=args.batch_size, num_train_epochs=args.epochs,
        max_steps=args.max_steps, learning_rate=args.lr, warmup_steps=args.warmup_ratio,  # < 1: a ratio
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, lr_scheduler_type="linear",
        seed=args.seed, bf16=args.bf16, use_cpu=not torch.cuda.is_available(), batch_sampler=BatchSamplers.NO_DUPLICATES, save_strategy="no",
        logging_steps=50, report_to="none", disable_tqdm=True, dataloader_drop_last=True)
    trainer = SentenceTransformerTrainer(model=model, args=training_args, train_dataset=train, loss=loss,
                                         callbacks=[timer])
    trainer.train()
    if args.save:
        model.save(args.output_dir)
    if args.timings:
        edges = [timer.start] + timer.ends
        step_seconds = [b - a for a, b in zip(edges, edges[1:])]
        peak_gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
        with open(args.timings, "w") as fh:
            json.dump({"step_seconds": step_seconds, "batch_size": args.batch_size, "peak_gpu_mib": peak_gpu}, fh)


if __name__ == "__main__":
    main()
