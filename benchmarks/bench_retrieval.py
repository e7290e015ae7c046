"""Retrieval evaluation speed: encode + score on a large corpus, mnr (1 and 2 processes) vs sentence-transformers'
InformationRetrievalEvaluator, same model (all-MiniLM-L6-v2), same BEIR folder, same metrics.

    python benchmarks/bench_retrieval.py                         # 50,000 documents
    python benchmarks/bench_retrieval.py --corpus-size 10000     # smaller, on a busy machine

The set (written once as a BEIR folder under --workdir): queries = the premises of SNLI test, relevant = their
entailments; the corpus = every distinct sentence of the shared SNLI and STSb files (premises that are queries
left out), topped up with seeded synthetic sentences (two halves of real sentences joined) to --corpus-size.
Each run is a fresh subprocess timed around the evaluation call only (model already loaded): ours with torch's
default threads, ours as 2 processes (`accelerate launch`, gloo, one thread each), and ST with default threads.
Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import NLI_DIR, NLI_FILES, OFFLINE_ENV, REPO, SHARED_DATA, minilm_path  # noqa: E402


def _tsv(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as fh:
        yield from csv.DictReader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)


def build_set(folder: Path, corpus_size: int, seed: int = 0) -> tuple[int, int, int]:
    """Write the BEIR folder; -> (queries, documents, documents that are real sentences)."""
    relevant: dict[str, list[str]] = {}
    for row in _tsv(NLI_DIR / "snli_test.tsv.gz"):
        if row["label"] == "entailment":
            relevant.setdefault(row["premise"], []).append(row["hypothesis"])
    sentences = dict.fromkeys(h for hyps in relevant.values() for h in hyps)
    for name in NLI_FILES:
        for row in _tsv(NLI_DIR / name):
            sentences.update(dict.fromkeys((row["premise"], row["hypothesis"])))
    for name in ("train.tsv", "validation.tsv"):
        for row in _tsv(SHARED_DATA / "stsb" / name):
            sentences.update(dict.fromkeys((row["sentence1"], row["sentence2"])))
    for premise in relevant:
        sentences.pop(premise, None)  # a query in the corpus would find itself
    docs = list(sentences)
    real = len(docs)
    rng = random.Random(seed)
    seen = set(docs)
    while len(docs) < corpus_size:
        a, b = rng.choice(docs[:real]).split(), rng.choice(docs[:real]).split()
        text = " ".join(a[: len(a) // 2 + 1] + b[len(b) // 2 :])
        if text not in seen and text not in relevant:
            seen.add(text)
            docs.append(text)
    keep = set(docs[:corpus_size])
    docs = docs[:corpus_size]
    doc_id = {t: f"d{i}" for i, t in enumerate(docs)}
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"_id": doc_id[t], "text": t}) + "\n" for t in docs)
    queries = [(f"q{i}", p) for i, p in enumerate(relevant) if any(h in keep for h in relevant[p])]
    with open(folder / "queries.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"_id": q, "text": p}) + "\n" for q, p in queries)
    with open(folder / "qrels" / "test.tsv", "w", encoding="utf-8") as fh:
        fh.write("query-id\tcorpus-id\tscore\n")
        fh.writelines(f"{q}\t{doc_id[h]}\t1\n" for q, p in queries for h in relevant[p] if h in keep)
    return len(queries), len(docs), min(real, len(docs))


def worker_ours(folder: str, out: str) -> None:
    from mnr import distributed
    from mnr.backbone import Backbone
    from mnr.evaluate import build_evaluators

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import Accelerator

        Accelerator(cpu=True)
    (ev,) = build_evaluators(folder, max_seq_length=128, batch_size=64)
    backbone = Backbone.load(minilm_path())
    distributed.barrier()
    start = time.perf_counter()
    metrics = ev.by_dim(backbone)[None]
    seconds = time.perf_counter() - start
    if distributed.rank() == 0:
        Path(out).write_text(json.dumps({"seconds": seconds, "metrics": metrics}))


def worker_st(folder: str, out: str) -> None:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.evaluation import InformationRetrievalEvaluator

    from mnr.retrieval import load_beir

    data = load_beir(folder)
    model = SentenceTransformer(minilm_path(), device="cpu")
    model.max_seq_length = 128
    ev = InformationRetrievalEvaluator(
        dict(zip(data.query_ids, data.queries)), dict(zip(data.corpus_ids, data.corpus)),
        {q: {data.corpus_ids[d] for d in rel} for q, rel in zip(data.query_ids, data.relevant)},
        mrr_at_k=[10], ndcg_at_k=[10], accuracy_at_k=[1], precision_recall_at_k=[1, 10, 100], map_at_k=[100],
        batch_size=64, name="bench")
    start = time.perf_counter()
    res = ev(model)
    seconds = time.perf_counter() - start
    metrics = {k.split("cosine_")[-1]: v for k, v in res.items() if "precision" not in k}
    Path(out).write_text(json.dumps({"seconds": seconds, "metrics": metrics}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus-size", type=int, default=50000)
    parser.add_argument("--workdir", default="/tmp/bench_retrieval")
    parser.add_argument("--runs", default="ours,ours2,st", help="which of ours, ours2, st, comma-separated")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads of the 1-process runs (0: torch's default); the 2-process run uses 1 each")
    parser.add_argument("--rounds", type=int, default=1, help="alternated rounds; the table shows the median")
    parser.add_argument("--worker", choices=["ours", "st"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        sys.path.insert(0, str(REPO))
        (worker_ours if args.worker == "ours" else worker_st)(args.folder, args.out)
        return
    work = Path(args.workdir)
    folder = work / f"snli_{args.corpus_size}"
    n_queries, n_docs, n_real = build_set(folder, args.corpus_size)
    print(f"set: {n_queries} queries (SNLI test premises), {n_docs} documents ({n_real} real sentences, the rest "
          f"synthetic), folder {folder}")
    env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": str(REPO)}
    me = [str(Path(__file__).resolve())]
    launch2 = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               "29631"]
    one = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    commands = {"ours": ([sys.executable, *me, "--worker", "ours"], one),
                "ours2": ([*launch2, *me, "--worker", "ours"], {"OMP_NUM_THREADS": "1"}),
                "st": ([sys.executable, *me, "--worker", "st"], one)}
    labels = {"ours": "mnr, 1 process", "ours2": "mnr, 2 processes (1 thread each)",
              "st": "sentence-transformers InformationRetrievalEvaluator"}
    results: dict[str, list[dict]] = {}
    for round_ in range(args.rounds):
        for name in args.runs.split(","):
            cmd, extra = commands[name]
            out = work / f"{name}_{args.corpus_size}.json"
            proc = subprocess.run([*cmd, "--folder", str(folder), "--out", str(out)], env={**env, **extra},
                                  cwd=REPO, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            r = json.loads(out.read_text())
            results.setdefault(name, []).append(r)
            print(f"round {round_} {labels[name]}: {r['seconds']:.1f} s, {(n_queries + n_docs) / r['seconds']:.0f} "
                  f"texts/s, ndcg@10 {r['metrics']['ndcg@10']:.4f}", flush=True)
    median = {name: sorted(rs, key=lambda r: r["seconds"])[len(rs) // 2] for name, rs in results.items()}
    threads = f"{args.threads} thread(s)" if args.threads else "torch's default threads"
    print(f"\n{args.rounds} round(s), median; 1-process runs with {threads}")
    print(f"\n| run | seconds | texts/s | vs ST | ndcg@10 | mrr@10 | recall@100 |\n|---|---:|---:|---:|---:|---:|---:|")
    st = median.get("st", {}).get("seconds")
    for name, r in median.items():
        ratio = f"{st / r['seconds']:.2f}x" if st else "-"
        m = r["metrics"]
        print(f"| {labels[name]} | {r['seconds']:.1f} | {(n_queries + n_docs) / r['seconds']:.0f} | {ratio} | "
              f"{m['ndcg@10']:.4f} | {m['mrr@10']:.4f} | {m['recall@100']:.4f} |")


if __name__ == "__main__":
    main()
