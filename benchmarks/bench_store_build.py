"""Where a cold token-store build spends its time: tokenizer CPU per text, then the build's phases.

1. The tokenizer alone: CPU seconds (best of 3, one Rayon thread) of `encode_batch` against `encode_batch_fast`
   (no character offsets; what the store uses) on the first --micro-texts anchors of the file.
2. The build in this process (`mnr.store.prepare_train_store`, no cache): wall seconds to the last row read, to the
   last chunk tokenised, to the files written; and the CPU seconds of the whole build.
3. The same build with the tokenizer stubbed out (every text one token): the reading, hashing and interning alone.

Input: an anchor/positive TSV, e.g. one that `benchmarks/bench_scale.py` made (its model dir holds the tokenizer):

    for part in tokenizer build no-tokenizer; do
        python benchmarks/bench_store_build.py /tmp/mnr-scale/pairs-1000000.tsv \
            --tokenizer /tmp/mnr-scale/tiny-minilm-vocab --part $part
    done
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def tokenizer_cpu(tokenizer, path: Path, n: int) -> dict[str, float]:
    from mnr.backbone import TokenPolicy

    with open(path, encoding="utf-8") as fh:
        next(fh)
        texts = [line.split("\t", 1)[0] for _, line in zip(range(n), fh)]
    backend = TokenPolicy.of(tokenizer, 128).backend()
    out = {}
    for name in ("encode_batch", "encode_batch_fast"):
        best = float("inf")
        for _ in range(3):
            start = time.process_time()
            getattr(backend, name)(texts, add_special_tokens=True)
            best = min(best, time.process_time() - start)
        out[name] = best
    return out


def build_phases(tokenizer, path: Path, stub: bool) -> dict[str, float]:
    from mnr.store import build as store, prepare_train_store
    from mnr.backbone import TokenPolicy

    stamps: dict[str, float] = {}
    start, cpu0 = time.time(), _cpu()
    finish, replace, encode = store._TextTable.finish, store.os.replace, TokenPolicy.token_ids

    def timed_finish(table):
        stamps["last row read"] = time.time() - start
        result = finish(table)
        stamps["last chunk tokenised"] = time.time() - start
        return result

    def timed_replace(a, b):
        stamps["files written"] = time.time() - start
        return replace(a, b)

    def one_token(policy, texts, backend=None):
        import numpy as np

        return np.ones(len(texts), np.int32), np.ones(len(texts), np.int64)

    cache = Path(tempfile.mkdtemp(prefix="mnr-build-"))
    store._TextTable.finish, store.os.replace = timed_finish, timed_replace
    if stub:
        TokenPolicy.token_ids = one_token
    try:
        prepare_train_store(str(path), tokenizer, 128, False, str(cache))
    finally:
        store._TextTable.finish, store.os.replace, TokenPolicy.token_ids = finish, replace, encode
        shutil.rmtree(cache, ignore_errors=True)
    stamps["build CPU s"] = _cpu() - cpu0
    return stamps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tsv", type=Path, help="anchor/positive TSV")
    p.add_argument("--tokenizer", required=True, help="a local model or tokenizer dir")
    p.add_argument("--part", choices=["tokenizer", "build", "no-tokenizer"], required=True,
                   help="one part per process: the tokenizer's thread count is fixed when its pool first starts")
    p.add_argument("--micro-texts", type=int, default=30_000)
    args = p.parse_args()
    if args.part == "tokenizer":
        os.environ["RAYON_NUM_THREADS"] = "1"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    print(f"{args.part}: {args.tsv.name}, load average before {os.getloadavg()[0]:.2f}")
    if args.part == "tokenizer":
        micro = tokenizer_cpu(tokenizer, args.tsv, args.micro_texts)
        print(f"tokenizer CPU s for {args.micro_texts} texts (best of 3, 1 thread): " +
              ", ".join(f"{k} {v:.3f} ({1e6 * v / args.micro_texts:.0f} us/text)" for k, v in micro.items()))
        return
    stamps = build_phases(tokenizer, args.tsv, stub=args.part == "no-tokenizer")
    print(", ".join(f"{k} {v:.1f}" for k, v in stamps.items()) + f"; load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
