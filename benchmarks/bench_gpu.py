"""GPU throughput: a bert-base-sized encoder (BertConfig() defaults, random init, the bert-base-uncased
vocabulary shipped in the all-MiniLM-L6-v2 package) at bf16, batch 256, real SNLI sentence lengths
(all entailment pairs of ../shared/data/nli): mnr vs sentence-transformers.  Prints pairs/s, peak GPU memory
and model FLOPs utilisation,

    MFU = 6 * non-embedding params * real (non-pad) tokens per second / 989e12   (H200 dense bf16)

so padding counts as waste.  Each trainer runs as its own subprocess, alternated, --rounds times.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python benchmarks/bench_gpu.py          # about 3-5 minutes on an H200
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402

PEAK_FLOPS = 989e12  # H100/H200 SXM dense bf16
OURS_WRAPPER = """
import json, os, sys, torch
from mnr.train import main
rc = main(sys.argv[1:])
json.dump({"peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0}, open(os.environ["MNR_BENCH_PEAK"], "w"))
sys.exit(rc)
"""


def build_model(path: Path) -> int:
    """Random-init BertConfig() encoder saved in mnr/sentence-transformers layout; -> non-embedding params."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from mnr.model import Encoder, save_model

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(common.minilm_path())  # bert-base-uncased WordPiece, 30522 ids
    config = BertConfig()  # 12 layers, 768 wide, 3072 MLP, 12 heads, vocab 30522: bert-base
    assert config.vocab_size == len(tokenizer), (config.vocab_size, len(tokenizer))
    encoder = Encoder(BertModel(config, add_pooling_layer=False))
    save_model(encoder, tokenizer, path, 128)
    embedding = sum(p.numel() for p in encoder.transformer.embeddings.parameters())
    return sum(p.numel() for p in encoder.parameters()) - embedding


def real_tokens_per_pair(data: Path, model_dir: Path) -> float:
    import csv

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    with open(data, encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    texts = [t for row in rows for t in row[:2]]
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=128)["input_ids"]]
    return sum(lengths) / len(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per run (data repeats after 35)")
    p.add_argument("--skip", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--ours-variants", default="|--length-buckets 1",
                   help="'|'-separated extra train_mnr.py flags, one run of ours per variant and round")
    p.add_argument("--workdir", default="")
    p.add_argument("--allow-cpu", action="store_true", help="smoke-test the script without a GPU (tiny settings)")
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        raise SystemExit("bench_gpu.py needs a CUDA GPU (none found)")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="mnr-gpu-"))
    model_dir = work / "bert-base-random"
    n_params = build_model(model_dir)
    data = work / "pairs.tsv"
    n = common.write_examples(data, hard_negatives=False)
    tokens_per_pair = real_tokens_per_pair(data, model_dir)
    print(f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}; {common.machine()}\n{n} SNLI pairs, {tokens_per_pair:.1f} real "
          f"tokens per pair, batch {args.batch_size}, bf16, {args.steps} steps (first {args.skip} not counted); "
          f"{n_params / 1e6:.1f}M non-embedding params", flush=True)
    variants = args.ours_variants.split("|")
    results: dict[str, list[dict]] = {}
    for rnd in range(args.rounds):
        for name in [f"ours {v}".strip() for v in variants] + ["sentence-transformers"]:
            out, log = work / f"run-{rnd}-{len(results.get(name, []))}-{name.replace(' ', '_')}", work / "log.txt"
            shutil.rmtree(out, ignore_errors=True)
            peak_file = work / "peak.json"
            if name.startswith("ours"):
                cmd = common.ours_cmd(str(model_dir), data, out, args.batch_size, args.steps,
                                      ["--no-hard-negatives", "--eval-data", "none", "--max-seq-length", "128"]
                                      + shlex.split(name[4:]))
                cmd = [cmd[0], "-c", OURS_WRAPPER] + cmd[2:]
                rc, wall, rss = common.run_child(cmd, log, {"ACCELERATE_MIXED_PRECISION": "bf16",
                                                            "MNR_BENCH_PEAK": str(peak_file)})
                seconds = [s for _, s in common.ours_step_times(out / "metrics.jsonl")] if rc == 0 else []
                peak = json.loads(peak_file.read_text())["peak_gpu_mib"] if rc == 0 else 0
            else:
                cmd = common.st_cmd(str(model_dir), data, out, args.batch_size, peak_file, args.steps, ["--bf16"])
                rc, wall, rss = common.run_child(cmd, log)
                rec = json.loads(peak_file.read_text()) if rc == 0 else {}
                seconds, peak = rec.get("step_seconds", []), rec.get("peak_gpu_mib") or 0
            if rc != 0:
                print(log.read_text()[-3000:])
                raise SystemExit(f"{name} failed (exit {rc})")
            pps = common.steady_pairs_per_s(seconds, args.batch_size, args.skip)
            mfu = 6 * n_params * tokens_per_pair * pps / PEAK_FLOPS
            results.setdefault(name, []).append({"pairs_per_s": pps, "peak_gpu_mib": peak, "mfu": mfu})
            print(f"round {rnd} {name}: {pps:.0f} pairs/s, peak GPU {peak / 1024:.1f} GiB, MFU {mfu:.1%}", flush=True)
    st = statistics.median(r["pairs_per_s"] for r in results["sentence-transformers"])
    print("\n| trainer | pairs/s (median) | per round | peak GPU GiB | MFU | vs ST | NLI epoch of 314k pairs |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for name, rows in results.items():
        med = statistics.median(r["pairs_per_s"] for r in rows)
        print(f"| {name} | {med:.0f} | {', '.join(format(r['pairs_per_s'], '.0f') for r in rows)} | "
              f"{max(r['peak_gpu_mib'] for r in rows) / 1024:.1f} | "
              f"{statistics.median(r['mfu'] for r in rows):.1%} | {med / st:.2f}x | {314_000 / med:.0f} s |")


if __name__ == "__main__":
    main()
