"""GPU throughput: a bert-base-sized encoder (BertConfig() defaults, random init, the bert-base-uncased vocabulary
of the all-MiniLM-L6-v2 package) at bf16 on real SNLI sentence lengths (all entailment pairs of ../shared/data/nli),
at batch 256 and at 4,096 with GradCache, for:

    mnr padded         train_mnr.py (length buckets, the default)
    mnr unpadded       the same with MNR_UNPADDED=1 (benchmarks/mnr_train.py: train_mnr.py --unpadded where the
                       config has that field, else mnr's Encoder switched to mnr.unpadded's forward)
    sentence-transformers  SentenceTransformerTrainer + MultipleNegativesRankingLoss (Cached... at 4,096)

Each run is its own subprocess, alternated within a round.  Writes benchmarks/results/<date>-<device>.json (and a
copy under $OUT when set) with pairs/s, peak GPU memory (torch.cuda.max_memory_allocated) and MFU on real tokens:

    MFU = pairs/s x training FLOPs per pair (mnr.flops: 6 N tokens + attention per text) / 989e12 (H200 dense bf16)

Prepare here, once (tokenizer, SNLI files and the wheels the device image lacks: datasets, dill, multiprocess):
    python benchmarks/bench_gpu.py --prepare bench_out/gpu_carry
Run on the H200 with carry ["bench_out/gpu_carry"], in about 8 minutes (--deadline-s skips what would not fit):
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site bench_out/gpu_carry/whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && python3 benchmarks/bench_gpu.py --carry bench_out/gpu_carry
On a CPU, end to end with a tiny model and 2 steps a run:
    python benchmarks/bench_gpu.py --smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402

RESULTS = common.REPO / "benchmarks" / "results"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
WHEELS = ("datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19")  # missing from the device image
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
# name, global batch, trainer, GradCache mini-batch (mnr: rows of [anchors; positives]; ST: rows per column)
SETTINGS = [("mnr padded", 256, "mnr", 0), ("mnr unpadded", 256, "mnr-unpadded", 0),
            ("sentence-transformers MNRL", 256, "st", 0),
            ("mnr padded, GradCache", 4096, "mnr", 512), ("mnr unpadded, GradCache", 4096, "mnr-unpadded", 512),
            ("sentence-transformers CachedMNRL", 4096, "st", 256)]
SMOKE_SETTINGS = [(name, 8 if batch == 256 else 16, trainer, mini and 8) for name, batch, trainer, mini in SETTINGS]
OURS = str(Path(__file__).resolve().parent / "mnr_train.py")  # train_mnr.py + MNR_UNPADDED + peak memory


def prepare(carry: Path) -> None:
    """The files the device machine lacks, under `carry`: tokenizer/, data/nli/, whl/."""
    (carry / "tokenizer").mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy2(Path(common.minilm_path()) / name, carry / "tokenizer" / name)
    (carry / "data" / "nli").mkdir(parents=True, exist_ok=True)
    for name in common.NLI_FILES:
        shutil.copy2(common.NLI_DIR / name, carry / "data" / "nli" / name)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                    "3.12", "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)],
                    "-d", str(carry / "whl"), *WHEELS], check=True)
    size = sum(f.stat().st_size for f in carry.rglob("*") if f.is_file())
    print(f"prepared {carry} ({size / 2**20:.1f} MiB): carry it as {str(carry)!r}")


def build_model(path: Path, tokenizer_dir: str, smoke: bool) -> None:
    """A random-init encoder saved as a plain transformers model (both trainers then mean-pool it)."""
    import torch
    import transformers
    from transformers import AutoTokenizer, BertConfig, BertModel

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)  # bert-base-uncased WordPiece, 30522 ids
    config = BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128) if smoke \
        else BertConfig()  # 12 layers, 768 wide, 3072 MLP, 12 heads, vocab 30522: bert-base
    assert config.vocab_size == len(tokenizer), (config.vocab_size, len(tokenizer))
    BertModel(config, add_pooling_layer=False).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def text_lengths(data: Path, model_dir: Path) -> tuple[int, list[int]]:
    """(pairs, real tokens of every text) of the TSV, truncated at 128 as both trainers do."""
    import csv

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    with open(data, encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    texts = [t for row in rows for t in row[:2]]
    return len(rows), [len(ids) for ids in tokenizer(texts, truncation=True, max_length=128)["input_ids"]]


def run_one(work: Path, model_dir: Path, data: Path, name: str, batch: int, trainer: str, mini: int, steps: int,
            timeout: float) -> tuple[int, list[float], dict, Path]:
    """-> (exit code, per-step seconds, peak-memory record, log)."""
    slug = "".join(c if c.isalnum() else "_" for c in name)
    out, log, peak_file = work / f"run-{slug}", work / f"{slug}.log", work / f"{slug}-peak.json"
    shutil.rmtree(out, ignore_errors=True)
    peak_file.unlink(missing_ok=True)
    if trainer.startswith("mnr"):
        extra = ["--no-hard-negatives", "--eval-data", "none", "--max-seq-length", "128"]
        extra += ["--mini-batch-size", str(mini)] if mini else []
        cmd = common.ours_cmd(str(model_dir), data, out, batch, steps, extra)
        cmd[1] = OURS
        env = {"ACCELERATE_MIXED_PRECISION": "bf16", "MNR_BENCH_PEAK": str(peak_file),
               "MNR_UNPADDED": "1" if trainer == "mnr-unpadded" else "0"}
        rc, _, _ = common.run_child(cmd, log, env, timeout=timeout)
        seconds = [s for _, s in common.ours_step_times(out / "metrics.jsonl")] if rc == 0 else []
    else:
        extra = ["--bf16"] + (["--cached-mini-batch-size", str(mini)] if mini else [])
        cmd = common.st_cmd(str(model_dir), data, out, batch, peak_file, steps, extra)
        rc, _, _ = common.run_child(cmd, log, timeout=timeout)
        seconds = json.loads(peak_file.read_text())["step_seconds"] if rc == 0 else []
    peak = json.loads(peak_file.read_text()) if rc == 0 and peak_file.exists() else {}
    return rc, seconds, peak, log


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per run at batch 256")
    p.add_argument("--steps-large", type=int, default=12, help="optimizer steps per run at batch 4,096")
    p.add_argument("--skip", type=int, default=5, help="first steps of a run not timed (start-up)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--deadline-s", type=float, default=510, help="start no run after this many seconds")
    p.add_argument("--only", default="", help="'|'-separated setting names to run (default: all)")
    p.add_argument("--carry", default="", help="the folder --prepare made (on the device machine)")
    p.add_argument("--prepare", default="", help="write the carry folder here and exit")
    p.add_argument("--smoke", action="store_true", help="CPU end-to-end check: tiny model, 2 steps a run")
    p.add_argument("--workdir", default="")
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args()
    if args.prepare:
        return prepare(Path(args.prepare))
    import torch

    from mnr.flops import mfu, model_shape, peak_flops, step_flops

    start = time.perf_counter()
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        raise SystemExit("bench_gpu.py needs a CUDA GPU (none found); --smoke runs it on a CPU")
    if args.smoke:
        args.steps = args.steps_large = 2
        args.skip, args.rounds = 1, 1
    if args.carry:
        common.NLI_DIR = Path(args.carry) / "data" / "nli"
    tokenizer_dir = str(Path(args.carry) / "tokenizer") if args.carry else common.minilm_path()
    work = common.work_dir(args.workdir or tempfile.mkdtemp(prefix="mnr-gpu-"), "mnr-gpu-")
    model_dir, data = work / "bert-random", work / "pairs.tsv"
    build_model(model_dir, tokenizer_dir, args.smoke)
    common.write_examples(data, hard_negatives=False)
    from transformers import AutoConfig

    shape = model_shape(AutoConfig.from_pretrained(model_dir))
    n_pairs, lengths = text_lengths(data, model_dir)
    flops_per_pair = step_flops(shape, lengths) / n_pairs  # 3 forwards: model FLOPs, no recompute
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = peak_flops(device)
    print(f"device: {device}; {common.machine()}\n{n_pairs} SNLI pairs, {sum(lengths) / n_pairs:.1f} real tokens per "
          f"pair, bf16, {shape.non_embedding_params / 1e6:.1f}M non-embedding params, "
          f"{flops_per_pair / 1e9:.2f} GFLOP per trained pair", flush=True)
    settings = SMOKE_SETTINGS if args.smoke else SETTINGS
    if args.only:
        settings = [s for s in settings if s[0] in args.only.split("|")]
    runs = []
    for rnd in range(args.rounds):
        for name, batch, trainer, mini in settings:
            elapsed = time.perf_counter() - start
            if elapsed > args.deadline_s:
                print(f"round {rnd} {name}: skipped ({elapsed:.0f} s > --deadline-s {args.deadline_s:.0f})", flush=True)
                runs.append({"name": name, "round": rnd, "skipped": True})
                continue
            steps = args.steps if batch <= 256 or args.smoke else args.steps_large
            rc, seconds, mem, log = run_one(work, model_dir, data, name, batch, trainer, mini, steps,
                                            timeout=max(60.0, 590 - elapsed))
            if rc != 0:
                print(log.read_text()[-3000:])
                print(f"round {rnd} {name}: FAILED (exit {rc}); log {log}", flush=True)
                runs.append({"name": name, "round": rnd, "failed": rc})
                continue
            if trainer == "mnr-unpadded" and mem.get("unpadded_forwards") == 0:
                raise SystemExit(f"{name}: the trainer never called the unpadded forward")
            pps = common.steady_pairs_per_s(seconds, batch, args.skip)
            rec = {"name": name, "round": rnd, "trainer": trainer, "batch_size": batch, "mini_batch": mini or None,
                   "unpadded": trainer == "mnr-unpadded", "unpadded_forwards": mem.get("unpadded_forwards"),
                   "pairs_per_s": pps, "steps_timed": len(seconds) - args.skip,
                   "peak_gpu_mib": mem.get("peak_gpu_mib"), "reserved_gpu_mib": mem.get("reserved_gpu_mib"),
                   "mfu": mfu(pps * flops_per_pair, peak),
                   "mfu_with_recompute": mfu(pps * flops_per_pair * (4 / 3 if mini else 1), peak)}
            runs.append(rec)
            shown = "n/a" if rec["mfu"] is None else f"{rec['mfu']:.1%}"
            print(f"round {rnd} {name}: {pps:.0f} pairs/s, peak GPU {(rec['peak_gpu_mib'] or 0) / 1024:.1f} GiB, "
                  f"MFU {shown}", flush=True)
    summary = summarise(runs)
    report = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), "device": device,
              "machine": common.machine(), "smoke": args.smoke,
              "versions": versions(), "model": {"config": "BertConfig() (bert-base)" if not args.smoke else "tiny",
                                                "non_embedding_params": shape.non_embedding_params, "dtype": "bf16"},
              "data": {"pairs": n_pairs, "real_tokens_per_pair": sum(lengths) / n_pairs,
                       "train_flops_per_pair": flops_per_pair},
              "peak_flops": peak, "steps": {"256": args.steps, "4096": args.steps_large, "skipped": args.skip},
              "runs": runs, "summary": summary}
    tag = "cpu-smoke" if args.smoke else ("h200" if "H200" in device else "".join(
        c if c.isalnum() else "-" for c in device.lower()))
    path = Path(args.results) / f"{report['date']}-{tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    if os.environ.get("OUT"):
        shutil.copy2(path, Path(os.environ["OUT"]) / path.name)
    print_table(summary)
    print(f"\nwritten: {path}  ({time.perf_counter() - start:.0f} s in all)")


def summarise(runs: list[dict]) -> list[dict]:
    """Median over rounds per setting, and the ratio to sentence-transformers at the same batch."""
    done = [r for r in runs if "pairs_per_s" in r]
    rows = []
    for name in dict.fromkeys(r["name"] for r in done):
        mine = [r for r in done if r["name"] == name]
        peaks = [r["peak_gpu_mib"] for r in mine if r["peak_gpu_mib"] is not None]
        mfus = [r["mfu"] for r in mine if r["mfu"] is not None]
        rows.append({"name": name, "trainer": mine[0]["trainer"], "batch_size": mine[0]["batch_size"],
                     "pairs_per_s": statistics.median(r["pairs_per_s"] for r in mine),
                     "per_round": [round(r["pairs_per_s"], 1) for r in mine],
                     "peak_gpu_mib": max(peaks) if peaks else None, "mfu": statistics.median(mfus) if mfus else None})
    for row in rows:
        st = next((r for r in rows if r["batch_size"] == row["batch_size"] and r["name"].startswith("sentence")), None)
        row["vs_st"] = row["pairs_per_s"] / st["pairs_per_s"] if st else None
        small = next((r for r in rows if r["batch_size"] < row["batch_size"] and r["trainer"] == row["trainer"]), None)
        row["memory_vs_batch_256"] = (row["peak_gpu_mib"] / small["peak_gpu_mib"]
                                      if small and row["peak_gpu_mib"] and small["peak_gpu_mib"] else None)
    return rows


def print_table(rows: list[dict]) -> None:
    print("\n| trainer | batch | pairs/s (median) | per round | peak GPU GiB | MFU | vs ST | memory vs 256 |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    fmt = lambda v, f, unit="": "n/a" if v is None else format(v, f) + unit  # noqa: E731
    for r in rows:
        print(f"| {r['name']} | {r['batch_size']} | {r['pairs_per_s']:.0f} | {', '.join(map(str, r['per_round']))} | "
              f"{fmt(r['peak_gpu_mib'] and r['peak_gpu_mib'] / 1024, '.1f')} | {fmt(r['mfu'], '.1%')} | "
              f"{fmt(r['vs_st'], '.2f', 'x')} | {fmt(r['memory_vs_batch_256'], '.2f', 'x')} |")


def versions() -> dict:
    import importlib.metadata as md

    return {name: md.version(name) for name in ("torch", "transformers", "accelerate", "sentence-transformers")}


if __name__ == "__main__":
    main()
