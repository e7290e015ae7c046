"""Loss: mnr.loss.mnr_loss vs the tutorial's per-anchor Python loop, forward + backward, on random
embeddings (d = 384, all-MiniLM-L6-v2's width), B = 32 ... 1024.  Both must give the same loss and gradients.

    python benchmarks/bench_loss.py                      # prints one table
    python benchmarks/bench_loss.py --sizes 512 --repeats 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mnr.loss import mnr_loss  # noqa: E402


def tutorial_loop_loss(anchors: torch.Tensor, positives: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    """The tutorial's loss: for each anchor i, cos_sim(anchor_i, every positive) * scale, cross-entropy with
    label i, averaged over anchors -- one small matrix product and one softmax per anchor."""
    losses = []
    for i in range(anchors.shape[0]):
        scores = F.cosine_similarity(anchors[i : i + 1], positives, dim=-1) * scale  # (B,)
        losses.append(F.cross_entropy(scores.unsqueeze(0), torch.tensor([i])))
    return torch.stack(losses).mean()


def time_fwd_bwd(fn, anchors, positives, repeats: int) -> float:
    """Median seconds of forward + backward over `repeats` runs after one warm-up run."""
    times = []
    for r in range(repeats + 1):
        a = anchors.detach().requires_grad_()
        p = positives.detach().requires_grad_()
        t0 = time.perf_counter()
        fn(a, p).backward()
        if r:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="32,64,128,256,512,1024")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); 1 avoids "
                        "OpenMP stalls when other processes share the cores")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, d={args.dim}, median of {args.repeats}")
    print("| B | mnr_loss fwd+bwd ms | tutorial loop fwd+bwd ms | speed-up | max abs loss diff | max abs grad diff |")
    print("|---:|---:|---:|---:|---:|---:|")
    for b in (int(s) for s in args.sizes.split(",")):
        anchors, positives = torch.randn(b, args.dim), torch.randn(b, args.dim)
        ours = time_fwd_bwd(lambda a, p: mnr_loss(a, p, scale=20.0), anchors, positives, args.repeats)
        loop = time_fwd_bwd(tutorial_loop_loss, anchors, positives, args.repeats)
        a1, p1 = anchors.clone().requires_grad_(), positives.clone().requires_grad_()
        a2, p2 = anchors.clone().requires_grad_(), positives.clone().requires_grad_()
        l1, l2 = mnr_loss(a1, p1, scale=20.0), tutorial_loop_loss(a2, p2)
        l1.backward()
        l2.backward()
        grad_diff = max((a1.grad - a2.grad).abs().max().item(), (p1.grad - p2.grad).abs().max().item())
        print(f"| {b} | {ours * 1e3:.2f} | {loop * 1e3:.1f} | {loop / ours:.0f}x | {abs(l1.item() - l2.item()):.1e} | "
              f"{grad_diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
