"""Peak memory per process, DDP vs FSDP2 (mnr.sharding.shard_model), 2 gloo CPU processes, a random decoder.

    python benchmarks/bench_fsdp.py                      # Qwen2-0.5B shape (vocab cut to 32768), full and LoRA
    python benchmarks/bench_fsdp.py --layers 4 --quick   # a smoke run
    python benchmarks/bench_fsdp.py --out benchmarks/results/2026-12-02-cpu-fsdp.txt

Table 1: for DDP (torch DDP, gradient_as_bucket_view off as Accelerate's default) and FSDP2 (per layer, then
the root, reshard after forward), full fine-tuning and LoRA (r 16, all-linear): STEPS AdamW steps of B pairs
per process at seq 64, last-token pooling, gathered MNR loss. Memory per process from /proc/<pid>/smaps_rollup
sampled every 50 ms by a thread: peak RSS and peak PSS (PSS splits shared pages, e.g. the torch libraries,
between the processes), over the whole run and over the steps only (after set-up: the model was built whole
on every process before sharding, as with Accelerate's cpu_ram_efficient_loading off). glibc's mmap threshold is
fixed at 128 KiB, so freed tensors leave RSS.
Table 2 (GradCache under FSDP2): a smaller decoder, 4 chunks per step, gradient sync on the last chunk only
(mnr.sharding.no_sync) vs a reduce-scatter after each chunk: seconds per step and peak PSS.
Not a test: numbers depend on the machine and its load (recorded with the table).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

QWEN2_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936)


class MemorySampler(threading.Thread):
    """Peak RSS and PSS (bytes) of this process from /proc/self/smaps_rollup, sampled every `every` seconds."""

    def __init__(self, every: float = 0.05):
        super().__init__(daemon=True)
        self.every, self.peak, self.running = every, {"rss": 0, "pss": 0}, True

    @staticmethod
    def now() -> dict:
        values = {}
        for line in open("/proc/self/smaps_rollup"):
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss"):
                values[key.lower()] = int(rest.split()[0]) * 1024
        return values

    def reset(self) -> None:
        self.peak = self.now()

    def run(self) -> None:
        while self.running:
            self.peak = {k: max(v, self.peak.get(k, 0)) for k, v in self.now().items()}
            time.sleep(self.every)


def worker(args) -> None:
    import torch
    import torch.distributed as dist
    from transformers import Qwen2Config, Qwen2Model

    from mnr import distributed, sharding
    from mnr.gradcache import cached_loss_and_backward
    from mnr.loss import mnr_loss
    from mnr.model import Encoder, Pipeline

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    sampler = MemorySampler()
    sampler.start()
    torch.manual_seed(0)
    shape = dict(QWEN2_05B, num_hidden_layers=args.layers, vocab_size=args.vocab)
    if args.small:
        shape.update(hidden_size=512, num_attention_heads=8, intermediate_size=2048)
    model = Encoder(Qwen2Model(Qwen2Config(**shape, attention_dropout=0.0)), pipeline=Pipeline(pooling="lasttoken"))
    params = sum(p.numel() for p in model.parameters())
    if args.lora:
        from peft import LoraConfig, get_peft_model

        model.transformer = get_peft_model(model.transformer, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                                         target_modules="all-linear"))
    if args.mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False)
    else:
        sharding.shard_model(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    setup = dict(sampler.peak)
    sampler.reset()
    gen = torch.Generator().manual_seed(rank)
    times = []
    for _ in range(args.steps):
        ids = torch.randint(1, args.vocab, (2 * args.batch, args.seq), generator=gen)
        mask = torch.ones_like(ids)

        def loss_fn(embeddings):
            anchors, positives = embeddings.chunk(2)
            return mnr_loss(anchors, positives, gather=distributed.all_gather_with_grad, rank=rank)

        start = time.perf_counter()
        if args.chunks > 1:
            cached_loss_and_backward(model, ids, mask, 2 * args.batch // args.chunks, loss_fn,
                                     no_sync=sharding.no_sync if args.sync == "last" else None)
        else:
            loss_fn(model(ids, mask)).backward()
        clip = sharding.clip_grad_norm_ if args.mode == "fsdp" else torch.nn.utils.clip_grad_norm_
        clip(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    time.sleep(0.1)
    sampler.running = False
    row = {"rank": rank, "params": params, "trainable": sum(p.numel() for p in trainable),  # a DTensor counts whole
           "setup": setup, "steps": sampler.peak,
        "run": {k: max(setup[k], sampler.peak[k]) for k in setup}, "step_s": times}
    rows = distributed.all_gather_object(row)
    if rank == 0:
        Path(args.json).write_text(json.dumps(rows))
    distributed.barrier()
    distributed.shutdown()


def launch(args, **conf) -> list[dict]:
    out = Path(args.work) / ("-".join(f"{k}{v}" for k, v in conf.items()) + ".json")
    flags = [f"--{k}={v}" for k, v in conf.items() if not isinstance(v, bool)] + [f"--{k}" for k, v in conf.items() if v is True]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_port",
           str(args.port), __file__, "--worker", "--json", str(out), "--layers", str(args.layers), "--vocab",
           str(args.vocab), "--seq", str(args.seq), "--batch", str(args.batch), "--steps", str(args.steps), *flags]
    # glibc's dynamic mmap threshold would keep freed tensors (the model as built before sharding) in the heap,
    # counted in RSS; a fixed threshold returns every tensor's pages on free, so RSS follows live memory
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               MALLOC_MMAP_THRESHOLD_="131072")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)}\nexit {proc.returncode}\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def available() -> int:
    """MemAvailable of this machine, bytes."""
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="fsdp", choices=["ddp", "fsdp"], help=argparse.SUPPRESS)
    parser.add_argument("--lora", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--small", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--chunks", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--sync", default="last", choices=["last", "each"], help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=QWEN2_05B["num_hidden_layers"])
    parser.add_argument("--vocab", type=int, default=32768, help="cut from Qwen2's 151936 to fit 2 DDP processes")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2, help="pairs per process")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1 step, no GradCache table")
    parser.add_argument("--runs", default="fsdp,fsdp-lora,ddp-lora,ddp", help="comma-separated, of these")
    parser.add_argument("--no-gradcache", action="store_true", help="no GradCache table")
    parser.add_argument("--work", default="/tmp/bench_fsdp")
    parser.add_argument("--port", type=int, default=29571)
    parser.add_argument("--out", help="also write the tables to this file")
    parser.add_argument("--append", action="store_true", help="add to --out instead of replacing it")
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        args.steps = 1
    Path(args.work).mkdir(parents=True, exist_ok=True)
    lines = [f"bench_fsdp: 2 gloo CPU processes, Qwen2 shape hidden 896, {args.layers} layers, 14 heads, 2 kv heads, "
             f"intermediate 4864, vocab {args.vocab}, seq {args.seq}, {args.batch} pairs per process, "
             f"{args.steps} AdamW steps, float32", f"load before: {os.getloadavg()}, {os.cpu_count()} CPUs"]
    lines += ["", "| run | params | trainable | peak RSS / process (GiB) | peak PSS / process (GiB) | "
              "steps only: peak PSS (GiB) | s / step |", "|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    params = 0
    runs = {"fsdp": ("fsdp", False), "fsdp-lora": ("fsdp", True), "ddp-lora": ("ddp", True), "ddp": ("ddp", False)}
    for mode, lora in (runs[r] for r in args.runs.split(",")):
        need = 2 * params * 4 * 5  # DDP, full: params, grads, gradient buckets, 2 AdamW moments, float32, x2
        if mode == "ddp" and not lora and need > 0.9 * available():
            lines.append(f"| DDP | skipped: needs ~{gib(need)} GiB for 2 processes, {gib(available())} GiB free |")
            print(lines[-1], flush=True)
            continue
        rows = launch(args, mode=mode, lora=lora)
        r0 = rows[0]
        params = r0["params"]
        line = (f"| {mode.upper() if mode == 'ddp' else 'FSDP2'}{' + LoRA' if lora else ''} | {r0['params'] / 1e6:.0f}M "
                f"| {r0['trainable'] / 1e6:.1f}M | {' / '.join(gib(r['run']['rss']) for r in rows)} "
                f"| {' / '.join(gib(r['run']['pss']) for r in rows)} | {' / '.join(gib(r['steps']['pss']) for r in rows)} "
                f"| {max(r0['step_s'][-1], rows[1]['step_s'][-1]):.1f} |")
        lines.append(line)
        print(line, flush=True)
    if not args.quick and not args.no_gradcache:
        extra = ["", f"GradCache under FSDP2: hidden 512, {args.layers} layers, intermediate 2048, vocab {args.vocab}, "
                 f"{4 * args.batch} pairs per process in 4 chunks, {args.steps} steps",
                 "| gradient sync | peak PSS / process (GiB) | steps only: peak PSS (GiB) | s / step (last) |",
                 "|---|---|---|---|"]
        print("\n".join(extra), flush=True)
        lines += extra
        big = argparse.Namespace(**{**vars(args), "batch": 4 * args.batch})
        for sync in ("last", "each"):
            rows = launch(big, mode="fsdp", small=True, chunks=4, sync=sync)
            name = "last chunk only (no_sync)" if sync == "last" else "reduce-scatter every chunk"
            line = (f"| {name} | {' / '.join(gib(r['run']['pss']) for r in rows)} | "
                    f"{' / '.join(gib(r['steps']['pss']) for r in rows)} | "
                    f"{max(r['step_s'][-1] for r in rows):.2f} |")
            lines.append(line)
            print(line, flush=True)
    lines.append(f"load after: {os.getloadavg()}")
    print(lines[-1])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a" if args.append else "w") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
