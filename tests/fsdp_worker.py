"""FSDP2 checks on 2 gloo CPU processes, run by tests/test_fsdp.py as
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_worker.py OUT_DIR train|resume
Every process computes its numbers; rank 0 writes them to OUT_DIR/<mode>.json and the test asserts on them.

train: for each case, a tiny random decoder (Llama, last-token pooling) or BERT (mean pooling), sharded with
  mnr.sharding.shard_model, trains STEPS steps at B pairs per process (mnr.objectives.MNR with gathered
  negatives, clipping active, AdamW); an unsharded copy trains on the same 2B pairs in this process alone (no process group involved).
  Recorded: the largest weight difference of the full state dict to the unsharded copy, the gradient norms of
  both, what the other process got from full_state_dict, nonfinite_parameters with a NaN in one shard.
  The "resume" case also saves a sharded checkpoint after step SAVE_AT and writes its final weights.
resume: the "resume" case from its checkpoint, in new processes, to the end; records the weight difference to
  the uninterrupted run. reshard: the same under another number of processes (load_sharded(reshard=True)).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

LOCAL_BATCH, STEPS, SAVE_AT, MINI = 4, 3, 2, 3
MAX_NORM = 0.5  # below the gradient norms here (about 1-5): clipping is active
CASES = {  # name: (architecture, variant)
    "llama_plain": ("llama", "plain"), "llama_gradcache_no_sync": ("llama", "no_sync"),
    "llama_gradcache_reduce_each": ("llama", "reduce_each"), "llama_lora": ("llama", "lora"),
    "llama_matryoshka": ("llama", "matryoshka"), "bert_plain": ("bert", "plain"),
    "bert_gradcache_no_sync": ("bert", "no_sync"), "bert_lora": ("bert", "lora"),
    "bert_matryoshka": ("bert", "matryoshka"), "resume": ("llama", "plain"),
}
VOCAB, SEQ = 96, 12


def build(arch: str, variant: str) -> torch.nn.Module:
    """The same random embedder on every process (seeded), dropout off."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

    from mnr.model import Encoder, Pipeline

    torch.manual_seed(0)
    if arch == "llama":
        transformer = LlamaModel(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=64, attention_dropout=0.0))
        pooling = "lasttoken"
    else:
        transformer = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                                add_pooling_layer=False)
        pooling = "mean"
    if variant == "lora":
        from peft import LoraConfig, get_peft_model

        transformer = get_peft_model(transformer, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                             target_modules="all-linear", init_lora_weights=False))
    return Encoder(transformer, pipeline=Pipeline(pooling=pooling))


def batch(step: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step: [anchors; positives] ids (2 * rows, SEQ), right-padded, a pure function of
    the step. Rows r*B ... r*B+B-1 of each role belong to process r."""
    gen = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(1, VOCAB, (2 * rows, SEQ), generator=gen)
    lengths = torch.randint(3, SEQ + 1, (2 * rows,), generator=gen)
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    return ids * mask, mask


def local_rows(ids: torch.Tensor, rank: int, per: int = 1) -> torch.Tensor:
    """[anchors; positives] of this process: those of `per` processes of B rows each, from rank * per on."""
    anchors, positives = ids.chunk(2)
    rows = slice(rank * per * LOCAL_BATCH, (rank + 1) * per * LOCAL_BATCH)
    return torch.cat([anchors[rows], positives[rows]])


def step(model, optimizer, ids, mask, variant: str, sharded: bool) -> float:
    """One training step (forward, backward, clip, AdamW); returns the gradient norm before clipping."""
    from mnr import distributed, sharding
    from mnr.gradcache import cached_loss_and_backward
    from mnr.loss import no_gather
    from mnr.objectives import MNR, Rows

    objective = MNR(dims=(32, 16, 8) if variant == "matryoshka" else ())

    def loss_fn(embeddings: torch.Tensor) -> torch.Tensor:  # [anchors; positives] of this process
        if sharded:
            return objective(embeddings, Rows(2), distributed.all_gather_with_grad, distributed.rank())
        return objective(embeddings, Rows(2), no_gather, 0)

    if variant in ("no_sync", "reduce_each"):
        chosen = sharding.no_sync if variant == "no_sync" else None
        cached_loss_and_backward(model, ids, mask, MINI, loss_fn, no_sync=chosen)
    else:
        loss_fn(model(ids, mask)).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    norm = sharding.clip_grad_norm_(params, MAX_NORM) if sharded else torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def optimizer_of(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)


def max_diff(full: dict, ref: dict) -> float:
    assert set(full) == set(ref), sorted(set(full) ^ set(ref))[:5]
    return max(float((full[k].float() - ref[k].float()).abs().max()) for k in ref)


def train_case(name: str, arch: str, variant: str, rank: int, world: int, out: Path) -> dict:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from mnr import sharding

    model = build(arch, variant)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ref = copy.deepcopy(model)
    sharding.shard_model(model)
    units = sum(isinstance(m, FSDPModule) for m in model.modules())
    all_dtensor = all(isinstance(p, DTensor) for p in model.parameters())
    opt, ref_opt = optimizer_of(model), optimizer_of(ref)
    norms, ref_norms = [], []
    for s in range(STEPS):
        ids, mask = batch(s, world * LOCAL_BATCH)
        ref_norms.append(step(ref, ref_opt, ids, mask, variant, sharded=False))
        norms.append(step(model, opt, local_rows(ids, rank), local_rows(mask, rank), variant, True))
        if name == "resume" and s + 1 == SAVE_AT:
            sharding.save_sharded(model, opt, out / "ckpt")
    full = sharding.full_state_dict(model)
    result = {"units": units, "all_dtensor": all_dtensor, "norms": norms, "ref_norms": ref_norms,
              "full_keys_elsewhere": len(full) if rank else None}
    if rank == 0:
        reference = ref.state_dict()
        result.update(weight_diff=max_diff(full, reference), moved=max_diff(initial, reference))
        if name == "resume":
            torch.save(full, out / "uninterrupted.pt")
    result["nonfinite_clean"] = sharding.nonfinite_parameters(model)
    victim = [n for n, p in model.named_parameters() if p.to_local().numel()][-1]
    if rank == world - 1:  # a NaN in the last process's shard only: every process must name it
        with torch.no_grad():
            dict(model.named_parameters())[victim].to_local().view(-1)[0] = float("nan")
    result["nonfinite_injected"] = sharding.nonfinite_parameters(model)
    result["victim"] = victim
    return result


def resume_case(rank: int, world: int, out: Path, saved_world: int = 2) -> dict:
    """The "resume" case from its checkpoint to the end; with another world size (reshard), each process
    takes saved_world / world processes' rows, so the global batch is the same."""
    from mnr import sharding

    arch, variant = CASES["resume"]
    model = sharding.shard_model(build(arch, variant))
    opt = optimizer_of(model)
    sharding.load_sharded(model, opt, out / "ckpt", reshard=world != saved_world)
    per = saved_world // world
    for s in range(SAVE_AT, STEPS):
        ids, mask = batch(s, saved_world * LOCAL_BATCH)
        step(model, opt, local_rows(ids, rank, per), local_rows(mask, rank, per), variant, True)
    full = sharding.full_state_dict(model)
    if rank:
        return {}
    return {"weight_diff": max_diff(full, torch.load(out / "uninterrupted.pt", weights_only=True))}


def main(out: Path, mode: str) -> None:
    from mnr import distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        if mode == "train":
            results = {name: train_case(name, *spec, rank, world, out) for name, spec in CASES.items()}
        else:  # resume: in as many processes as saved; reshard: in another number
            results = {mode: resume_case(rank, world, out)}
        gathered = distributed.all_gather_object(results)
        if rank == 0:
            (out / f"{mode}.json").write_text(json.dumps(gathered, indent=1))
    finally:
        distributed.barrier()
        distributed.shutdown()  # leave the group before exit: gloo's teardown at interpreter exit can abort


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
