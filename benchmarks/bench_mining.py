"""Hard-negative mining and Matryoshka (issue 14): short all-MiniLM-L6-v2 runs on the shared SNLI pairs, each
scored by `python -m mnr.evaluate` on two dev sets built from the shared data: STSb validation (every
--sts-every-th pair; Spearman x100) and SNLI test as retrieval (its first --retrieval-rows rows: premise -> its
entailments, contradictions as distractors; nDCG@10), and mining throughput of `mnr.mine` vs
sentence-transformers' `mine_hard_negatives`.  The training pairs come from the front of the shared SNLI
validation file (--pairs <= 3000), so the SNLI test rows are held out.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python benchmarks/bench_mining.py --workdir /tmp/bench-mining

(a) entailment pairs with: no negatives (--no-hard-negatives), the SNLI contradiction of the premise, a negative
    mined by the base model from the pairs' own positives (mnr.mine, k=1, --relative-margin 0.05);
(b) Matryoshka: one run with --matryoshka-dims 384,128,32 vs runs trained at one size only (--matryoshka-dims 128,
    --matryoshka-dims 32; 384 = run (a)'s contradiction run), each evaluated at 384, 128 and 32 (--eval-dims);
(c) mining throughput (texts encoded and searched per second, model loading excluded) of both tools on the same
    queries and corpus, k=1, batch 32.
Every training run: --max-steps STEPS --batch-size BATCH, lr 2e-5, 10% warm-up, seed 42, max 128 tokens.
Prints markdown tables; a summary JSON of every number goes to WORKDIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

HYPER = ["--lr", "2e-5", "--warmup-ratio", "0.1", "--seed", "42", "--max-seq-length", "128", "--eval-data", "none"]
DIMS = (384, 128, 32)
STS_NAME, RET_NAME = "stsb_validation_dev", "snli_test_retrieval"  # the dev sets' file stems = evaluator names


def memory_bytes(n_queries: int, n_corpus: int, dim: int, k: int) -> dict[str, int]:
    """Peak memory of one `mnr.mine` process's state (bytes): float32 embeddings of queries and corpus, one score
    block with its top-k temporaries, and the gathered (score, index) rows of every query (float64 pairs)."""
    from mnr.mine import DOC_CHUNK, QUERY_CHUNK

    block = QUERY_CHUNK * min(DOC_CHUNK, n_corpus) * 4
    return {"embeddings": (n_queries + n_corpus) * dim * 4, "score_block": block,
            "top_k_buffers": QUERY_CHUNK * 4 * k * 16 + n_queries * k * 16}


def dev_sets(work: Path, sts_every: int, retrieval_rows: int) -> list[str]:
    """The two dev files (names as above) from the shared data."""
    import gzip

    sts_lines = common.STSB_VALIDATION.read_text(encoding="utf-8").splitlines(keepends=True)
    sts = work / f"{STS_NAME}.tsv"
    sts.write_text(sts_lines[0] + "".join(sts_lines[1::sts_every]), encoding="utf-8")
    with gzip.open(common.NLI_DIR / "snli_test.tsv.gz", "rt", encoding="utf-8") as fh:
        nli_lines = fh.read().splitlines(keepends=True)
    ret = work / f"{RET_NAME}.tsv"
    ret.write_text("".join(nli_lines[: retrieval_rows + 1]), encoding="utf-8")
    return [str(sts), str(ret)]


def evaluate(model: str, log: Path, dims: tuple[int, ...], data: list[str]) -> dict:
    """mnr.evaluate's JSON results on the dev sets of one model; {label: {metric: value}}."""
    cmd = [sys.executable, "-m", "mnr.evaluate", model, "--json", "--data", ",".join(data)]
    if dims:
        cmd += ["--eval-dims", ",".join(map(str, dims))]
    rc, _, _ = common.run_child(cmd, log)
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith('{"model"')]
    if rc != 0 or not lines:
        raise SystemExit(f"evaluation of {model} failed (exit {rc}); see {log}")
    return json.loads(lines[-1])["results"]


def train(name: str, data: Path, work: Path, model: str, args, extra: list[str]) -> tuple[str, float]:
    out = work / name
    cmd = common.ours_cmd(model, data, out, args.batch_size, args.steps, HYPER + extra)
    rc, seconds, _ = common.run_child(cmd, work / f"{name}.log")
    if rc != 0:
        raise SystemExit(f"training {name} failed (exit {rc}); see {work / f'{name}.log'}")
    print(f"trained {name}: {seconds:.0f} s", flush=True)
    return str(out), seconds


def mine_snli(pairs: Path, work: Path, model: str) -> tuple[Path, dict]:
    out = work / "mined.tsv"
    cmd = [sys.executable, "-m", "mnr.mine", str(pairs), "--output", str(out), "--model", model,
           "--num-negatives", "1", "--relative-margin", "0.05", "--batch-size", "32"]
    rc, _, _ = common.run_child(cmd, work / "mine.log")
    if rc != 0:
        raise SystemExit(f"mining failed (exit {rc}); see {work / 'mine.log'}")
    return out, json.loads((work / "mined.tsv.summary.json").read_text())


def subset(all_pairs: Path, all_triplets: Path, pairs: Path, triplets: Path, n: int) -> tuple[int, int]:
    """The first n pairs, and the contradiction triplets of exactly those pairs: every variant, the same anchors."""
    head, *rows = all_pairs.read_text(encoding="utf-8").splitlines(keepends=True)
    rows = rows[:n]
    pairs.write_text(head + "".join(rows), encoding="utf-8")
    keep = {tuple(r.rstrip("\n").split("\t")) for r in rows}
    thead, *trows = all_triplets.read_text(encoding="utf-8").splitlines(keepends=True)
    trows = [r for r in trows if tuple(r.split("\t")[:2]) in keep]
    triplets.write_text(thead + "".join(trows), encoding="utf-8")
    return len(rows), len(trows)


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _metrics(res: dict, label: str) -> tuple[str, str]:
    sts = res[STS_NAME + label]["spearman"]
    ret = res[RET_NAME + label]["ndcg@10"]
    return f"{sts:.2f}", f"{ret:.4f}"


def table_negatives(base: dict, runs: dict, mined: dict, args) -> list[str]:
    lines = [f"| training data ({args.steps} steps x {args.batch_size}) | STSb val Spearman | SNLI test retrieval "
             f"nDCG@10 | train s |",
             "|---|---:|---:|---:|", _row(["base all-MiniLM-L6-v2 (no training)", *_metrics(base, ""), "-"])]
    names = {"pairs": "entailment pairs, no negatives", "contradiction": "+ SNLI contradiction as negative",
             "mined": "+ mined negative (mnr.mine, base model, k=1, relative margin 0.05)"}
    for key, label in names.items():
        res, seconds = runs[key]
        lines.append(_row([label, *_metrics(res, ""), f"{seconds:.0f}"]))
    return lines


def table_mined(mined: dict) -> list[str]:
    pos, neg = mined["positive_scores"], mined["negative_scores"]
    return [f"Mining: {mined['pairs']} pairs, {mined['queries']} queries, corpus {mined['corpus']} texts (the "
            f"positives); {mined['queries_with_fewer_than_k']} queries without a negative "
            f"({mined['pairs_left_out']} pairs left out); cosine of positives mean {pos['mean']:.3f} "
            f"(p5 {pos['p5']:.3f}), of mined negatives mean {neg['mean']:.3f} (p95 {neg['p95']:.3f}); "
            f"candidates skipped by the relative margin: {mined['candidates_skipped'].get('relative_margin', 0)}; "
            f"{mined['seconds']:.0f} s, {mined['texts_per_s']:.1f} texts/s."]


def table_matryoshka(base: dict, mat: dict, single: dict) -> list[str]:
    lines = ["| eval dim | base: STSb / nDCG@10 | Matryoshka 384,128,32: STSb / nDCG@10 | trained at this dim only: "
             "STSb / nDCG@10 |", "|---:|---:|---:|---:|"]
    for dim in DIMS:
        label = "" if dim == DIMS[0] else f"@{dim}"
        cells = [" / ".join(_metrics(res, label)) for res in (base, mat, single[dim])]
        lines.append(_row([dim, *cells]))
    return lines


def throughput(pairs: Path, work: Path, model: str, n_queries: int, n_corpus: int) -> list[str]:
    """Both tools on the same n_queries anchors (distinct) with their positives, plus extra corpus texts."""
    import csv

    rows = list(csv.reader(open(pairs, encoding="utf-8"), delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    seen, anchors, positives, extra = set(), [], [], []
    for a, p in rows:
        if a not in seen and len(anchors) < n_queries:
            seen.add(a)
            anchors.append(a)
            positives.append(p)
        else:
            extra.append(p)
    taken = set(positives)
    corpus = [t for t in dict.fromkeys(extra) if t not in taken][: max(0, n_corpus - len(positives))]
    sub = work / "tp_pairs.tsv"
    sub.write_text("anchor\tpositive\n" + "".join(f"{a}\t{p}\n" for a, p in zip(anchors, positives)))
    (work / "tp_corpus.tsv").write_text("text\n" + "".join(f"{t}\n" for t in corpus))
    cmd = [sys.executable, "-m", "mnr.mine", str(sub), "--corpus", str(work / "tp_corpus.tsv"), "--output",
           str(work / "tp_mined.tsv"), "--model", model, "--num-negatives", "1", "--batch-size", "32"]
    rc, _, _ = common.run_child(cmd, work / "tp_mnr.log")
    ours = json.loads((work / "tp_mined.tsv.summary.json").read_text())
    st_seconds = _st_mine(anchors, positives, corpus, model)
    n_texts = ours["queries"] + ours["corpus"]
    return ["| tool | queries | corpus | texts encoded | seconds | texts/s |", "|---|---:|---:|---:|---:|---:|",
            _row(["mnr.mine (exact blocked top-k)", ours["queries"], ours["corpus"], n_texts, f"{ours['seconds']:.1f}",
                  f"{ours['texts_per_s']:.1f}"]),
            _row(["sentence-transformers mine_hard_negatives", ours["queries"], ours["corpus"], n_texts,
                  f"{st_seconds:.1f}", f"{n_texts / st_seconds:.1f}"])]


def _st_mine(anchors: list[str], positives: list[str], corpus: list[str], model: str) -> float:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    st = SentenceTransformer(model, device="cpu")
    data = Dataset.from_dict({"anchor": anchors, "positive": positives})
    start = time.perf_counter()
    mine_hard_negatives(data, st, corpus=corpus, num_negatives=1, batch_size=32, verbose=False)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="", help="where data, models and logs go (default: a temp dir)")
    p.add_argument("--steps", type=int, default=120, help="optimizer steps per training run (default 120)")
    p.add_argument("--batch-size", type=int, default=32, help="training batch (default 32)")
    p.add_argument("--sts-every", type=int, default=1, help="STSb validation: every n-th pair (default 1: all)")
    p.add_argument("--retrieval-rows", type=int, default=600, help="SNLI test rows of the retrieval dev set")
    p.add_argument("--pairs", type=int, default=2000, help="entailment pairs used (mined, trained on)")
    p.add_argument("--throughput-queries", type=int, default=1000)
    p.add_argument("--throughput-corpus", type=int, default=2000)
    p.add_argument("--throughput-only", action="store_true", help="run (c) only")
    args = p.parse_args()
    work = common.work_dir(args.workdir, "mnr-mining-")
    model = common.minilm_path()
    print(f"machine: {common.machine()}", flush=True)
    mem = memory_bytes(1_000_000, 1_000_000, 384, 13)
    print("mnr.mine memory for 1M queries and a 1M-text corpus, d=384, 13 candidates retrieved per query: "
          + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in mem.items()), flush=True)
    pairs, triplets = work / "pairs.tsv", work / "triplets.tsv"
    all_pairs, all_triplets = work / "all_pairs.tsv", work / "all_triplets.tsv"
    common.write_examples(all_pairs, False)
    common.write_examples(all_triplets, True)
    n_pairs, n_triplets = subset(all_pairs, all_triplets, pairs, triplets, args.pairs)
    print(f"training data: the first {n_pairs} entailment pairs of the shared SNLI files; {n_triplets} of them have "
          f"a contradiction", flush=True)
    if args.throughput_only:
        tp = throughput(all_pairs, work, model, args.throughput_queries, args.throughput_corpus)
        print("\n### (c) Mining throughput\n\n" + "\n".join(tp), flush=True)
        return
    data = dev_sets(work, args.sts_every, args.retrieval_rows)
    mined_file, mined = mine_snli(pairs, work, model)
    print("\n".join(table_mined(mined)), flush=True)
    base = evaluate(model, work / "eval-base.log", DIMS, data)
    runs, single = {}, {}
    results = {"base": base, "mined": mined, "runs": runs, "single": single}

    def done(name: str, res: dict) -> None:  # every finished step is kept, in case a later one fails
        print(f"{name}: STSb {_metrics(res, '')[0]}, nDCG@10 {_metrics(res, '')[1]}", flush=True)
        (work / "results.json").write_text(json.dumps(results, indent=2, default=str))

    for key, train_file, extra in (("pairs", pairs, ["--no-hard-negatives"]), ("contradiction", triplets, []),
                             ("mined", mined_file, [])):
        out, seconds = train(key, train_file, work, model, args, extra)
        runs[key] = (evaluate(out, work / f"eval-{key}.log", DIMS, data), seconds)
        done(key, runs[key][0])
    print("\n### (a) Negatives\n\n" + "\n".join(table_negatives(base, runs, mined, args)), flush=True)
    mat_out, _ = train("matryoshka", triplets, work, model, args, ["--matryoshka-dims", "384,128,32"])
    mat = results["matryoshka"] = evaluate(mat_out, work / "eval-matryoshka.log", DIMS, data)
    done("matryoshka", mat)
    single[384] = runs["contradiction"][0]
    for dim in DIMS[1:]:
        out, _ = train(f"only{dim}", triplets, work, model, args, ["--matryoshka-dims", str(dim)])
        single[dim] = evaluate(out, work / f"eval-only{dim}.log", DIMS, data)
        done(f"only{dim}", single[dim])
    print("\n### (b) Matryoshka\n\n" + "\n".join(table_matryoshka(base, mat, single)), flush=True)
    tp = throughput(all_pairs, work, model, args.throughput_queries, args.throughput_corpus)
    print("\n### (c) Mining throughput\n\n" + "\n".join(tp), flush=True)
    print("\n### (a) Negatives, again\n\n" + "\n".join(table_negatives(base, runs, mined, args) + [""] +
                                                   table_mined(mined)), flush=True)


if __name__ == "__main__":
    main()
