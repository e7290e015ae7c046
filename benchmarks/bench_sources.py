"""Per-source batches and k hard negatives (issue 13): short all-MiniLM-L6-v2 runs on ../shared/data, one table.

(a) two sources, SNLI entailment pairs + STSb-train pairs with score >= 4 (written as an anchor/positive TSV),
    one source per global batch (the default) vs --mix-sources;
(b) SNLI (premise, entailment, contradictions), one hard negative per query vs --negatives-per-query K.
Every run: seed 42, lr 2e-5, --max-steps/--batch-size from --steps/--batch-size (default 120 x 32), scored after
training by STSb validation Spearman and a retrieval nDCG@10: by default the trainer's own evaluation (all 1500
STSb validation pairs and the embedded stsb_retrieval set); with --eval-pairs N (a slow, shared CPU) the first
N STSb validation pairs and, as retrieval, the first N STSb validation pairs scored >= 4 (anchor/positive rows).
Skips with a message when the shared data is absent.

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python benchmarks/bench_sources.py
    python benchmarks/bench_sources.py --steps 20 --batch-size 16 --eval-pairs 200 --k 3 --jobs 4
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

HYPER = ["--lr", "2e-5", "--warmup-ratio", "0.1", "--scale", "20", "--seed", "42", "--max-seq-length", "128"]
STSB_TRAIN = common.SHARED_DATA / "stsb" / "train.tsv"


def _rows(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)
        yield from reader


def write_data(work: Path) -> dict[str, Path]:
    """snli_pairs.tsv (all entailment pairs), stsb_pairs.tsv (STSb train, score >= 4) and snli_nli.tsv (all SNLI
    rows in one premise/hypothesis/label file)."""
    pairs = work / "snli_pairs.tsv"
    common.write_examples(pairs, hard_negatives=False)
    stsb = work / "stsb_pairs.tsv"
    with open(stsb, "w", encoding="utf-8") as fh:
        fh.write("anchor\tpositive\n")
        fh.writelines(f"{a}\t{b}\n" for a, b, score in _rows(STSB_TRAIN)
                      if float(score) >= 4 and a.strip() != b.strip())
    nli = work / "snli_nli.tsv"
    with open(nli, "w", encoding="utf-8") as fh:
        fh.write("premise\thypothesis\tlabel\n")
        for name in common.NLI_FILES:
            fh.writelines("\t".join(row) + "\n" for row in _rows(common.NLI_DIR / name))
    return {"pairs": pairs, "stsb": stsb, "nli": nli}


def write_eval(work: Path, n_pairs: int) -> str:
    """--eval-data of a small evaluation: the first n STSb validation pairs, and its first n pairs scored >= 4 as
    retrieval."""
    rows = list(_rows(common.STSB_VALIDATION))
    sts, retrieval = work / "sts_dev.tsv", work / "retrieval_dev.tsv"
    with open(sts, "w", encoding="utf-8") as fh:
        fh.write("sentence1\tsentence2\tscore\n")
        fh.writelines("\t".join(r) + "\n" for r in rows[:n_pairs])
    with open(retrieval, "w", encoding="utf-8") as fh:
        fh.write("anchor\tpositive\n")
        good = [(a, b) for a, b, score in rows if float(score) >= 4 and a.strip() != b.strip()]
        fh.writelines(f"{a}\t{b}\n" for a, b in good[:n_pairs])
    return f"{sts},{retrieval}"


def pick(scores: dict, suffix: str) -> float | None:
    return next((v for k, v in scores.items() if k.endswith(suffix)), None)


def final_scores(metrics: Path) -> dict[str, float]:
    """The evaluation record written after training (the last one with evaluator/metric keys)."""
    scores = {}
    for line in metrics.read_text().splitlines():
        rec = json.loads(line)
        if any("/" in key for key in rec):
            scores = rec
    return scores


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--k", default="3", help="negatives per query of run (b)'s second row (a number or 'all')")
    p.add_argument("--eval-pairs", type=int, default=0, help="0: the trainer's default evaluation; N: the small one")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (a shared CPU gives each process its share)")
    p.add_argument("--workdir", default="", help="where data, models and logs go (default: a temp dir)")
    args = p.parse_args()
    if not (common.NLI_DIR.is_dir() and STSB_TRAIN.is_file()):
        print(f"skipped: the shared data ({common.SHARED_DATA}) is absent; set MNR_SHARED_DATA")
        return
    work = common.work_dir(args.workdir, "mnr-sources-")
    model = common.minilm_path()
    print(f"machine: {common.machine()}\nworkdir: {work}", flush=True)
    data = write_data(work)
    two = f"{data['pairs']},{data['stsb']}"
    evaluation = ["--eval-data", write_eval(work, args.eval_pairs)] if args.eval_pairs else []
    runs = [("(a) SNLI pairs + STSb>=4 pairs", "one source per global batch", two, ["--no-hard-negatives"]),
            ("(a) SNLI pairs + STSb>=4 pairs", "--mix-sources", two, ["--no-hard-negatives", "--mix-sources"]),
            ("(b) SNLI with contradictions", "1 negative per query", str(data["nli"]),
             ["--hard-negatives", "--negatives-per-query", "1"]),
            ("(b) SNLI with contradictions", f"{args.k} negatives per query", str(data["nli"]),
             ["--hard-negatives", "--negatives-per-query", args.k])]
    def one(i: int) -> str:
        setup, variant, train, flags = runs[i]
        out, log = work / f"run{i}", work / f"run{i}.log"
        cmd = common.ours_cmd(model, train, out, args.batch_size, args.steps,
                              HYPER + flags + evaluation + ["--log-steps", "10"])
        cmd[cmd.index("--train-data") + 1] = train
        rc, wall, _ = common.run_child(cmd, log)
        scores = final_scores(out / "metrics.jsonl") if rc == 0 else {}
        spearman, ndcg = pick(scores, "/spearman"), pick(scores, "/ndcg@10")
        row = (f"| {setup} | {variant} | {'-' if spearman is None else f'{spearman:.2f}'} | "
               f"{'-' if ndcg is None else f'{ndcg:.4f}'} | {wall:.0f} |" + ("" if rc == 0 else f" failed ({log})"))
        print(row, flush=True)
        return row

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        rows = list(pool.map(one, range(len(runs))))
    print(f"\n{args.steps} steps, batch {args.batch_size}, seed 42, all-MiniLM-L6-v2\n")
    dev = (f"first {args.eval_pairs} STSb validation pairs; retrieval: the first {args.eval_pairs} STSb validation "
           f"pairs >= 4" if args.eval_pairs
           else "all STSb validation; retrieval: embedded stsb_retrieval")
    print(f"evaluation after training: {dev}\n")
    print("| data | variant | STSb Spearman | retrieval nDCG@10 | wall s |")
    print("|---|---|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
