"""Start-up and memory at scale: seeded synthetic pairs at 0.1M, 1M, 3M (10M with --with-10m), 1 and 2 processes.

For every size and process count: a cold start (empty token cache: the store is built) and a warm start (the
store is mapped), each `train_mnr.py --max-steps 3 --eval-data none` timed to its exit; the peak PSS of each
training process (from /proc/<pid>/smaps_rollup, sampled every 0.2 s: PSS splits shared pages between the
processes that map them, RSS would count the shared store once per process); and the time to build one epoch's
batches over the store.  The model is a tiny random BERT (2 layers, hidden 32) with all-MiniLM-L6-v2's WordPiece
tokenizer (30k words), so start-up is data-bound.

    python benchmarks/bench_scale.py --sizes 0.01,0.1,1,3 --procs 1,2 --work /tmp/mnr-scale

Every start is measured on a machine that may be shared: the load average is printed next to each row.

`--machines`: the split build.  Two `accelerate launch` commands with the multi-node config stand for two
machines, one training process each, each pinned to its own core (`os.sched_setaffinity`, inherited by the
launcher's children and seen by the tokenizer's thread pool): two one-core machines.  Each size is cold-started
twice, with a node-local cache dir per machine (each machine builds the whole store alone) and with one shared
cache dir (the machines build one store together, each tokenising a share of the texts):

    python benchmarks/bench_scale.py --machines --sizes 1 --work /tmp/mnr-scale
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

REPO = common.REPO


def make_model(path: Path) -> Path:
    """A random 2-layer BERT with the real MiniLM tokenizer (vocabulary 30522)."""
    if (path / "model.safetensors").exists():
        return path
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(common.minilm_path())
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config, add_pooling_layer=False).save_pretrained(path, safe_serialization=True)
    return path


def make_pairs(path: Path, n_pairs: int, words: list[str], seed: int = 0) -> Path:
    """n_pairs anchor/positive rows, every text distinct (a serial number), 6-24 words each, seeded."""
    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    vocab = np.array(words, dtype=object)
    tmp = path.with_suffix(".part")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write("anchor\tpositive\n")
        for lo in range(0, n_pairs, 100_000):
            m = min(100_000, n_pairs - lo)
            lines = []
            for role in range(2):
                counts = rng.integers(5, 24, m)  # + the serial number = 6..24 words
                picks = vocab[rng.integers(0, len(vocab), int(counts.sum()))]
                ends = np.cumsum(counts)
                lines.append([" ".join(picks[e - c:e]) + f" {2 * (lo + i) + role}" for i, (c, e) in
                              enumerate(zip(counts, ends))])
            fh.write("".join(f"{a}\t{p}\n" for a, p in zip(*lines)))
    tmp.rename(path)
    return path


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _pss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _is_trainer(pid: int) -> bool:
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
    except OSError:
        return False
    return any(c.endswith(b"train_mnr.py") for c in cmd) and not any(b"accelerate" in c for c in cmd)


def _env() -> dict:
    return {**os.environ, **common.OFFLINE_ENV, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(cmd: list[str], log: Path) -> tuple[float, float]:
    """(wall seconds, peak PSS MiB of the largest training process)."""
    env = _env()
    peak: dict[int, float] = {}
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        while proc.poll() is None:
            for pid in _descendants(proc.pid):
                if _is_trainer(pid):
                    pss = _pss_mib(pid)
                    if pss is not None:
                        peak[pid] = max(peak.get(pid, 0.0), pss)
            time.sleep(0.2)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); log: {log}\n{log.read_text()[-3000:]}")
    return wall, max(peak.values(), default=float("nan"))


def train_cmd(procs: int, model: Path, data: Path, cache: Path, out: Path) -> list[str]:
    args = ["train_mnr.py", "--model", str(model), "--train-data", str(data), "--cache-dir", str(cache),
            "--output-dir", str(out), "--overwrite-output-dir", "--eval-data", "none", "--max-steps", "3",
            "--batch-size", "32", "--max-seq-length", "128", "--no-hard-negatives", "--report-to", "none",
            "--no-progress", "--log-steps", "1"]
    if procs == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
            str(_free_port()), *args]


def machines_cold_start(model: Path, data: Path, work: Path, shared: bool) -> tuple[float, list[int]]:
    """(wall seconds until both machines exited, texts tokenised per machine) of a cold start on two one-core
    "machines" (see the module docstring)."""
    import json

    port = _free_port()
    caches = [work / "cache-shared"] * 2 if shared else [work / f"cache-node{m}" for m in (0, 1)]
    for cache in caches:
        shutil.rmtree(cache, ignore_errors=True)
    env = _env()
    procs, logs = [], []
    start = time.perf_counter()
    for machine in (0, 1):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               "accelerate_configs/multi_node.yaml", "--num_processes", "2", "--machine_rank", str(machine),
               "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "--mixed_precision", "no",
               "--dynamo_backend", "no", *train_cmd(1, model, data, caches[machine], work / f"out-m{machine}")[1:]]
        logs.append(work / f"machines-{'shared' if shared else 'local'}-{machine}.log")
        core = machine % os.cpu_count()
        procs.append(subprocess.Popen(cmd, stdout=open(logs[-1], "w"), stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                      preexec_fn=lambda core=core: os.sched_setaffinity(0, {core})))
    for proc, log in zip(procs, logs):
        if proc.wait() != 0:
            raise SystemExit(f"machine launch failed ({proc.returncode}); log: {log}\n{log.read_text()[-3000:]}")
    wall = time.perf_counter() - start
    texts = []
    for cache in dict.fromkeys(caches):
        [manifest] = cache.glob("store-*/manifest.json")
        texts.append(json.loads(manifest.read_text())["built_by"]["texts"])
        shutil.rmtree(cache, ignore_errors=True)
    return wall, texts


def machines_table(model: Path, work: Path, sizes: list[float], words: list[str]) -> None:
    print("| pairs | cache dir | cold start s (2 one-core machines) | texts tokenised per machine | load avg (1 min) |")
    print("|---:|---|---:|---|---:|", flush=True)
    for size in sizes:
        n = int(round(size * 1_000_000))
        data = make_pairs(work / f"pairs-{n}.tsv", n, words)
        for shared in (False, True):
            wall, texts = machines_cold_start(model, data, work, shared)
            where = "shared: one store, split" if shared else "node-local: a store per machine"
            split = " + ".join(f"{x:,}" for x in texts[0]) if shared else " and ".join(f"{t[0]:,}" for t in texts)
            print(f"| {n:,} | {where} | {wall:.1f} | {split} | {os.getloadavg()[0]:.2f} |", flush=True)


def epoch_seconds(model: Path, data: Path, cache: Path, procs: int) -> float:
    from transformers import AutoTokenizer

    from mnr.batching import GlobalBatchSampler
    from mnr.store import prepare_train_store

    store = prepare_train_store(str(data), AutoTokenizer.from_pretrained(model), 128, False, str(cache))
    sampler = GlobalBatchSampler(store.text_ids, 32, procs, 0, seed=0, lengths=store.lengths, length_grouping=8)
    start = time.perf_counter()
    sampler.global_batches(0)
    return time.perf_counter() - start


def synthetic_epochs(n: int, procs: list[int]) -> None:
    """Epoch-build time of the sampler alone over n pairs (anchors repeat: 3 examples per anchor on average)."""
    from mnr.batching import GlobalBatchSampler

    rng = np.random.default_rng(0)
    text_ids = np.stack([rng.integers(0, n // 3, n), np.arange(n, 2 * n)], axis=1).astype(np.int32)
    lengths = rng.integers(3, 60, n).astype(np.int32)
    for world in procs:
        sampler = GlobalBatchSampler(text_ids, 32, world, 0, seed=0, lengths=lengths, length_grouping=8)
        start = time.perf_counter()
        steps = sampler.steps_in_epoch(0)
        print(f"{n:,} examples, {world} x 32: {steps} global batches in {time.perf_counter() - start:.2f} s "
              f"(load {os.getloadavg()[0]:.2f})", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="0.01,0.1,1,3", help="millions of pairs, comma-separated")
    p.add_argument("--with-10m", action="store_true", help="also 10M pairs")
    p.add_argument("--procs", default="1,2")
    p.add_argument("--work", default="/tmp/mnr-scale", help="data files and the model are kept here between runs")
    p.add_argument("--epoch-only", type=float, default=0,
                   help="only time one epoch's batches over this many million synthetic examples (no training)")
    p.add_argument("--machines", action="store_true",
                   help="instead: cold starts on two one-core 'machines' (two launches), node-local vs shared cache")
    p.add_argument("--warm-repeats", type=int, default=1, help="warm starts per row; the fastest (and its PSS) is kept")
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    if args.epoch_only:
        synthetic_epochs(int(args.epoch_only * 1_000_000), [int(x) for x in args.procs.split(",")])
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = make_model(work / "tiny-minilm-vocab")
    from transformers import AutoTokenizer

    words = [w for w in AutoTokenizer.from_pretrained(model).get_vocab() if w.isalpha() and len(w) > 2]
    sizes = [float(s) for s in args.sizes.split(",")] + ([10.0] if args.with_10m else [])
    print(f"machine: {common.machine()}; load before: {os.getloadavg()}", flush=True)
    if args.machines:
        machines_table(model, work, sizes, words)
        return
    print("| pairs | processes | TSV MB | cold start s | warm start s | peak PSS per process MiB (warm) | "
          "peak PSS MiB (cold) | epoch build s | load avg (1 min) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    for size in sizes:
        n = int(round(size * 1_000_000))
        data = make_pairs(work / f"pairs-{n}.tsv", n, words)
        for procs in [int(x) for x in args.procs.split(",")]:
            cache = work / f"cache-{n}-{procs}"
            shutil.rmtree(cache, ignore_errors=True)
            cold, cold_pss = run(train_cmd(procs, model, data, cache, work / "out"), work / f"cold-{n}-{procs}.log")
            warm, warm_pss = min(run(train_cmd(procs, model, data, cache, work / "out"), work / f"warm-{n}-{procs}.log")
                                 for _ in range(args.warm_repeats))
            epoch = epoch_seconds(model, data, cache, procs)
            shutil.rmtree(cache, ignore_errors=True)
            print(f"| {n:,} | {procs} | {data.stat().st_size / 1e6:.0f} | {cold:.1f} | {warm:.1f} | {warm_pss:.0f} | "
                  f"{cold_pss:.0f} | {epoch:.2f} | {os.getloadavg()[0]:.2f} |", flush=True)


if __name__ == "__main__":
    main()
