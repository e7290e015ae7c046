"""Multi-process checks, run by tests/test_distributed.py as
    accelerate launch --multi_gpu --num_processes 2 tests/dist_worker.py TINY_MODEL_DIR OUT_JSON
(gloo process group on the CPU). Every process computes its numbers; rank 0 writes all of them to OUT_JSON
and the test asserts on them (an exception here fails the launch, which the test also reports).

1. the loss of this process's anchors with gathered candidates equals the single-process loss of the same
   anchors against the concatenated batch, and the gradient each process gets, divided by N as DDP does,
   equals the single-process gradient (random embeddings: pairs, triplets, symmetric, k = 3 negatives with
   and without empty, masked slots);
2. GradCache under DDP (no_sync on all chunks but the last) gives the uncached gradient, and both equal the
   gradient of the single-process loss over the whole N*B batch (tiny random BERT, dropout off).
"""

from __future__ import annotations

import copy
import json
import sys

import torch


def max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def loss_checks(rank: int, world: int, local_batch: int = 4, dim: int = 16) -> dict:
    import torch.nn.functional as F

    from mnr import distributed
    from mnr.loss import mnr_loss, ranking_loss

    results = {}
    cases = {"pairs": (2, False), "triplets": (3, False), "symmetric": (2, True), "symmetric_triplets": (3, True),
             "k3": (5, False), "k3_masked": (5, False)}
    for name, (n_roles, symmetric) in cases.items():
        gen = torch.Generator().manual_seed(1234)  # same global batch on every process
        full = [torch.randn(world * local_batch, dim, generator=gen).requires_grad_() for _ in range(n_roles)]
        rows = slice(rank * local_batch, (rank + 1) * local_batch)
        local = [t.detach()[rows].clone().requires_grad_() for t in full]
        full_mask = (torch.rand(world * local_batch, n_roles - 2, generator=gen) > 0.4) if name.endswith("masked") \
            else None
        mask = None if full_mask is None else full_mask[rows]

        gathered = mnr_loss(local[0], local[1], local[2:] or None, negative_mask=mask, symmetric=symmetric,
                            gather=distributed.all_gather_with_grad, rank=rank)
        gathered.backward()

        # single process: the same anchors ranked against the concatenated batch (no process group involved)
        anchors = F.normalize(full[0], dim=-1)
        negatives = [F.normalize(t, dim=-1) if full_mask is None else F.normalize(t, dim=-1)[full_mask[:, j]]
                     for j, t in enumerate(full[2:])]  # masked slots are no candidates
        candidates = torch.cat([F.normalize(full[1], dim=-1), *negatives])  # [all positives; all negatives]
        single_mine = ranking_loss(anchors[rows], candidates, 20.0, rank * local_batch)
        if symmetric:
            positives = F.normalize(full[1], dim=-1)
            single_mine = (single_mine + ranking_loss(positives[rows], anchors, 20.0, rank * local_batch)) / 2
        single_all = mnr_loss(full[0], full[1], full[2:] or None, negative_mask=full_mask,
                              symmetric=symmetric)  # the loss over the whole N*B batch
        single_all.backward()
        results[name] = {
            "gathered_loss": float(gathered.detach()), "single_loss_mine": float(single_mine.detach()),
            "single_loss_all": float(single_all.detach()),
            # DDP divides the summed gradient by N: that must be the single-process gradient of our rows
            "grad_diff": max_diff([t.grad / world for t in local], [t.grad[rows] for t in full]),
            "grad_max": max(float(t.grad.abs().max()) for t in full),
        }
    return results


def texts(n: int, role: str) -> list[str]:
    words = "man woman dog cat child boy girl person".split()
    places = "street water house tree grass car bike food".split()
    return [{"anchor": f"a {words[i % 8]} {i} is playing near the {places[(i // 8) % 8]}",
             "positive": f"the {words[i % 8]} {i} plays outside",
             "negative": f"two {words[(i + 3) % 8]} are sleeping in the {places[i % 8]} {i}",
             "negative_2": f"a {words[(i + 5) % 8]} {i} sits on a roof",
             "negative_3": f"nobody {i} is in the {places[(i + 2) % 8]} today"}[role] for i in range(n)]


def gradcache_checks(accelerator, model_path: str, local_batch: int = 4, mini_batch: int = 3) -> dict:
    from mnr import distributed
    from mnr.gradcache import cached_loss_and_backward
    from mnr.loss import mnr_loss, split_roles
    from mnr.model import load_encoder

    rank, world = accelerator.process_index, accelerator.num_processes
    encoder, tokenizer = load_encoder(model_path)
    reference = copy.deepcopy(encoder)
    model = accelerator.prepare(encoder)  # DDP
    model.train()
    n = world * local_batch

    def tokens(rows: slice, roles):
        batch = tokenizer([t for role in roles for t in texts(n, role)[rows]], padding=True, truncation=True,
                          max_length=32, return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"]

    results = {}
    triplet, k3 = ("anchor", "positive", "negative"), ("anchor", "positive", "negative", "negative_2", "negative_3")
    cases = {"triplets": (triplet, {}), "symmetric": (triplet, {"symmetric": True}),
             "matryoshka": (triplet, {"dims": (32, 16, 8), "dim_weights": (1.0, 0.5, 0.25)}),  # the tiny model is 32-d
             "k3": (k3, {})}
    for case, (roles, options) in cases.items():
        def loss_fn(embeddings, gather=distributed.all_gather_with_grad, rank=rank, roles=roles, options=options):
            parts = split_roles(embeddings, len(roles))
            return mnr_loss(parts[0], parts[1], parts[2:], gather=gather, rank=rank, **options)

        ids, mask = tokens(slice(rank * local_batch, (rank + 1) * local_batch), roles)
        loss = loss_fn(model(ids, mask))
        accelerator.backward(loss)
        uncached = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        cached_loss = cached_loss_and_backward(model, ids, mask, mini_batch, loss_fn, accelerator.backward,
                                               accelerator.no_sync)
        cached = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)

        # single process: the whole N*B batch through an identical, unwrapped copy, no gather
        full_ids, full_mask = tokens(slice(0, n), roles)
        reference.zero_grad(set_to_none=True)
        single = loss_fn(reference(full_ids, full_mask), gather=lambda t: t, rank=0)
        single.backward()
        single_grads = [p.grad.clone() for p in reference.parameters()]
        results[case] = {
            "loss": float(loss), "cached_loss": float(cached_loss), "single_loss_all": float(single),
            "cached_vs_uncached": max_diff(cached, uncached), "uncached_vs_single": max_diff(uncached, single_grads),
            "cached_vs_single": max_diff(cached, single_grads),
            "grad_max": max(float(g.abs().max()) for g in single_grads),
        }
    return results


def main() -> None:
    from accelerate import Accelerator

    from mnr import distributed

    model_path, out_path = sys.argv[1], sys.argv[2]
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    assert world == distributed.world_size() == 2, f"expected 2 processes, got {world}"
    torch.manual_seed(0)
    mine = {"rank": rank, "world": world, "distributed_type": str(accelerator.distributed_type),
            "loss": loss_checks(rank, world), "gradcache": gradcache_checks(accelerator, model_path)}
    everyone = distributed.all_gather_object(mine)
    if accelerator.is_main_process:
        with open(out_path, "w", encoding="utf-8") as fh:
            json.dump(everyone, fh, indent=2)
    accelerator.wait_for_everyone()
    # As mnr.train's close(): the DDP model released and the group left while the interpreter is whole; DDP's
    # last gloo work objects, destroyed only during interpreter shutdown, abort a process now and then
    # ("terminate called without an active exception": this worker's launch failed so once in CI).
    accelerator.free_memory()
    distributed.shutdown()


if __name__ == "__main__":
    main()
