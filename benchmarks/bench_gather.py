"""Scaling check on 2 CPU processes (gloo): what the cross-process negatives cost next to the encoder.

Per process and step it times (median of --repeats):
  * gather + loss: mnr_loss with all_gather_with_grad over (B, d) embeddings, forward + backward;
  * the same loss without gather (local negatives only);
  * DDP's gradient all-reduce of an all-MiniLM-L6-v2-sized fp32 gradient (what every DDP step sends anyway);
  * the encoder: all-MiniLM-L6-v2 forward + backward on one real batch of B SNLI pairs (B <= 64 only).
and prints the bytes each collective moves next to the computed formula (see BENCHMARKS.md, scaling note).

    HF_HUB_OFFLINE=1 python benchmarks/bench_gather.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def worker(rank: int, world: int, port: int, sizes: list[int], dim: int, repeats: int, pairs: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # 2 processes on 2 cores
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from mnr.distributed import all_gather_with_grad
    from mnr.loss import mnr_loss

    torch.manual_seed(rank)
    lines = []
    for b in sizes:
        anchors, positives = torch.randn(b, dim, requires_grad=True), torch.randn(b, dim, requires_grad=True)

        def with_gather():
            mnr_loss(anchors, positives, scale=20.0, gather=all_gather_with_grad, rank=rank).backward()

        def local():
            mnr_loss(anchors, positives, scale=20.0).backward()

        lines.append((b, timed(with_gather, repeats), timed(local, repeats)))
    n_params = 22_565_376  # all-MiniLM-L6-v2 without pooler
    grad = torch.randn(n_params)
    ddp = timed(lambda: dist.all_reduce(grad), max(3, repeats // 5))
    encoder_s = {}
    import common
    from mnr.batching import Collator, GlobalBatchSampler
    from mnr.model import load_encoder
    from mnr.store import prepare_train_store

    encoder, tokenizer = load_encoder(common.minilm_path())
    data = prepare_train_store(pairs, tokenizer, 128, False, os.path.join(os.path.dirname(pairs), "cache"))
    for b in [s for s in sizes if s <= 64]:
        batch = Collator(data.token_ids, data.text_ids, tokenizer.pad_token_id)(
            GlobalBatchSampler(data.text_ids, b, seed=rank).local_batches(0)[0])
        encoder_s[b] = timed(lambda: encoder(batch["input_ids"], batch["attention_mask"]).sum().backward(),
                             max(3, repeats // 10))
    if rank == 0:
        with open(out, "w") as fh:
            fh.write(f"{world} gloo processes, 1 thread each, d={dim}, fp32\n")
            fh.write(f"DDP gradient all-reduce of {n_params / 1e6:.1f}M fp32 values ({n_params * 4 / 2**20:.0f} MiB): "
                     f"{ddp * 1e3:.1f} ms per step\n")
            fh.write("| B per process | gather+loss fwd+bwd ms | local loss fwd+bwd ms | gather cost ms | "
                     "forward gather bytes in | backward all-reduce bytes | encoder fwd+bwd ms | gather / encoder |\n")
            fh.write("|---:|---:|---:|---:|---:|---:|---:|---:|\n")
            for b, g, loc in lines:
                enc = encoder_s.get(b)
                fwd_bytes = (world - 1) * b * dim * 4
                bwd_bytes = world * b * dim * 4
                fh.write(f"| {b} | {g * 1e3:.2f} | {loc * 1e3:.2f} | {(g - loc) * 1e3:.2f} | {fwd_bytes / 1024:.0f} KiB | "
                         f"{bwd_bytes / 1024:.0f} KiB (x2(N-1)/N on a ring) | "
                         f"{'' if enc is None else f'{enc * 1e3:.0f}'} | "
                         f"{'' if enc is None else f'{(g - loc) / enc:.2%}'} |\n")
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="32,256,1024")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--port", type=int, default=29533)
    args = p.parse_args()
    import common

    work = Path(tempfile.mkdtemp(prefix="mnr-gather-"))
    common.write_examples(work / "pairs.tsv", False)
    out = work / "table.md"
    mp.spawn(worker, args=(2, args.port, [int(s) for s in args.sizes.split(",")], args.dim, args.repeats,
                           str(work / "pairs.tsv"), str(out)), nprocs=2)
    print(out.read_text())


if __name__ == "__main__":
    main()
