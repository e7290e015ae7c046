"""The unpadded forward under 2-process gathering, run by tests/test_unpadded.py as
    accelerate launch --multi_gpu --num_processes 2 tests/unpadded_dist_worker.py OUT_JSON
(gloo on the CPU).  Per family (tiny BERT, tiny Llama): each process embeds its rows unpadded under DDP, with
GradCache (no_sync on all chunks but the last) and gathered candidates; its gradient must equal that of the padded
forward of one process over the whole global batch.  Rank 0 writes every process's numbers to OUT_JSON."""

from __future__ import annotations

import copy
import json
import sys

import torch


def check(accelerator, family: str, local_batch: int = 4, mini_batch: int = 3) -> dict:
    from test_unpadded import FAMILIES, batch, padded_embed, pad_id

    from mnr import distributed
    from mnr.gradcache import cached_loss_and_backward
    from mnr.loss import mnr_loss, split_roles
    from mnr.unpadded import UnpaddedEncoder

    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(0)
    reference = FAMILIES[family]()
    reference.set_attn_implementation("sdpa")
    model = accelerator.prepare(UnpaddedEncoder(copy.deepcopy(reference), "mean"))  # DDP
    n = world * local_batch
    anchors, a_mask = batch(n, pad=pad_id(reference), seed=11)
    positives, p_mask = batch(n, pad=pad_id(reference), seed=12)
    mine = slice(rank * local_batch, (rank + 1) * local_batch)
    ids, mask = torch.cat([anchors[mine], positives[mine]]), torch.cat([a_mask[mine], p_mask[mine]])

    def loss_fn(embeddings, gather=distributed.all_gather_with_grad, rank=rank):
        return mnr_loss(*split_roles(embeddings, 2), gather=gather, rank=rank)

    cached_loss_and_backward(model, ids, mask, mini_batch, loss_fn, accelerator.backward, accelerator.no_sync)
    cached = [p.grad.clone() for p in model.parameters()]
    single = loss_fn(padded_embed(reference, torch.cat([anchors, positives]), torch.cat([a_mask, p_mask]), "mean"),
                     gather=lambda t: t, rank=0)
    single.backward()
    grads = [p.grad for p in reference.parameters()]
    return {"cached_vs_single": max(float((a - b).abs().max()) for a, b in zip(cached, grads)),
            "grad_max": max(float(g.abs().max()) for g in grads)}


def main() -> None:
    from accelerate import Accelerator

    from mnr import distributed

    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2, f"expected 2 processes, got {accelerator.num_processes}"
    mine = {family: check(accelerator, family) for family in ("bert", "llama")}
    everyone = distributed.all_gather_object(mine)
    if accelerator.is_main_process:
        with open(sys.argv[1], "w", encoding="utf-8") as fh:
            json.dump(everyone, fh, indent=2)
    accelerator.wait_for_everyone()
    accelerator.free_memory()  # as mnr.train's close(): DDP released while the interpreter is whole
    distributed.shutdown()


if __name__ == "__main__":
    main()
