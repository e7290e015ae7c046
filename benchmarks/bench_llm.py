"""Decoder (LLM) training cost on the CPU: a randomly initialised decoder of Qwen2-0.5B's shape, full fine-tuning
vs LoRA, with and without gradient checkpointing; and GradCache's peak memory on a smaller decoder.

    python benchmarks/bench_llm.py                    # 1 untimed + 1 timed step per configuration
    python benchmarks/bench_llm.py --steps 0          # the recorded run (benchmarks/results/*-cpu-llm.txt)
    python benchmarks/bench_llm.py --steps 1 --layers 4 --vocab 32000   # a quick look

One training step = one forward over [anchors; positives] (4 pairs of 64 random tokens: 8 sequences, no
padding), last-token pooling, mnr.loss.mnr_loss, backward, AdamW step over the parameters that train.  Each
configuration runs in a fresh subprocess; it reports the trainable parameters, the process's peak RSS (VmHWM),
its RSS after building the model, its PSS at the end (/proc/self/smaps_rollup) and pairs/s over the timed steps
(after one untimed step; with --steps 0, the first).  The machine's load average is printed with every row: the cores may be shared.
Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QWEN2_05B = {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
             "intermediate_size": 4864, "vocab_size": 151936}
SMALL = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 1024, "vocab_size": 151936}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _pss_kib() -> int:
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def child(cfg: dict) -> dict:
    """One configuration, in this process: build, train cfg['steps'] + 1 steps, measure."""
    import torch
    from transformers import AutoConfig, AutoModel

    sys.path.insert(0, str(REPO))
    from mnr.checkpointing import enable_gradient_checkpointing
    from mnr.gradcache import cached_loss_and_backward
    from mnr.loss import mnr_loss, split_roles
    from mnr.model import Encoder, Pipeline

    torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen2", **cfg["shape"], max_position_embeddings=128, use_cache=False,
                                  tie_word_embeddings=True)
    transformer = AutoModel.from_config(config)
    rss_model = _status_kib("VmRSS")
    if cfg["lora"]:
        from mnr.lora import LoraSettings, apply_lora

        transformer = apply_lora(transformer, LoraSettings(r=16, alpha=32))
    if cfg["checkpointing"]:
        enable_gradient_checkpointing(transformer, lora=cfg["lora"])
    encoder = Encoder(transformer, pipeline=Pipeline(pooling="lasttoken")).train()
    params = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    pairs = cfg["pairs"]
    ids = torch.randint(0, config.vocab_size, (2 * pairs, cfg["seq_len"]))
    mask = torch.ones_like(ids)

    def loss_fn(embeddings):
        return mnr_loss(*split_roles(embeddings, 2))

    times = []
    for _ in range(cfg["steps"] + 1):
        start = time.perf_counter()
        if cfg["mini_batch"]:
            cached_loss_and_backward(encoder, ids, mask, cfg["mini_batch"], loss_fn)
        else:
            loss_fn(encoder(ids, mask)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    timed = times[1:] or times
    return {"trainable": sum(p.numel() for p in params), "total": sum(p.numel() for p in encoder.parameters()),
            "rss_model_mib": rss_model / 1024, "peak_rss_mib": _status_kib("VmHWM") / 1024,
            "pss_end_mib": _pss_kib() / 1024, "s_per_step": sum(timed) / len(timed),
            "pairs_per_s": pairs * len(timed) / sum(timed), "first_step_s": times[0],
            "load": os.getloadavg()[0]}


def run(cfg: dict, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(cfg)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore",
           "OMP_NUM_THREADS": str(cfg["threads"])}
    load_before = os.getloadavg()[0]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:.0f} s", "load_before": load_before}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:120], "load_before": load_before}
    return {**json.loads(lines[-1]), "load_before": load_before}


def table(title: str, rows: list[tuple[str, dict]]) -> str:
    head = (f"| {title} | trainable params | peak RSS MiB | RSS after build MiB | PSS at end MiB | s/step | "
            f"pairs/s | load 1-min (before, after) |")
    out = [head, "|" + "---|" * 8]
    for name, r in rows:
        if "error" in r:
            out.append(f"| {name} | error: {r['error']} | | | | | | {r['load_before']:.1f} |")
            continue
        out.append(f"| {name} | {r['trainable']:,} of {r['total']:,} | {r['peak_rss_mib']:,.0f} | "
                   f"{r['rss_model_mib']:,.0f} | {r['pss_end_mib']:,.0f} | {r['s_per_step']:.1f} | "
                   f"{r['pairs_per_s']:.3f} | {r['load_before']:.1f}, {r['load']:.1f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=1, help="timed steps after the untimed first one (0: time the first)")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--layers", type=int, default=QWEN2_05B["num_hidden_layers"])
    ap.add_argument("--vocab", type=int, default=QWEN2_05B["vocab_size"])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--no-gradcache", action="store_true", help="skip the GradCache memory rows")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return
    import torch
    import transformers

    shape = {**QWEN2_05B, "num_hidden_layers": args.layers, "vocab_size": args.vocab}
    base = {"shape": shape, "pairs": args.pairs, "seq_len": args.seq_len, "steps": args.steps,
            "threads": args.threads, "mini_batch": 0}
    started = time.time()
    print(f"# bench_llm {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: torch {torch.__version__}, "
          f"transformers {transformers.__version__}, {os.cpu_count()} CPUs, {args.threads} threads, "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"# decoder: Qwen2 {shape}, sequence length {args.seq_len}, {args.pairs} pairs per step, "
          f"LoRA r=16 alpha=32 all-linear; " + (f"{args.steps} timed step(s) after 1 untimed" if args.steps else
          "1 step per configuration, timed (its first: AdamW's state allocation included)") + "\n", flush=True)
    rows = []
    for lora in (False, True):
        for ckpt in (False, True):
            name = f"{'LoRA' if lora else 'full'}{' + checkpointing' if ckpt else ''}"
            rows.append((name, run({**base, "lora": lora, "checkpointing": ckpt}, args.timeout)))
            print(f"  done: {name}", file=sys.stderr, flush=True)
    print(table("Qwen2-0.5B shape", rows), flush=True)
    if not args.no_gradcache:
        small = {**base, "shape": SMALL, "lora": False, "checkpointing": False, "steps": 0}
        gc_rows = [(f"plain, batch 32", run({**small, "pairs": 32}, args.timeout)),
                   (f"GradCache, batch 256, mini-batch 32", run({**small, "pairs": 256, "mini_batch": 32}, args.timeout)),
                   (f"plain, batch 256", run({**small, "pairs": 256}, args.timeout))]
        print(f"\n# GradCache on a smaller Qwen2 {SMALL}, full fine-tuning, 1 step each "
              f"(s/step is that step)\n", flush=True)
        print(table("smaller decoder", gc_rows), flush=True)
    print(f"\n# total {time.time() - started:.0f} s; load average at the end "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
