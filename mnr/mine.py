"""Hard-negative mining: (anchor, positive) pairs -> (anchor, positive, negative_1..k) training rows.

    python -m mnr.mine PAIRS --output mined.tsv [--corpus FILE] [--num-negatives 3] [--range-min 0]
        [--range-max N] [--margin M] [--relative-margin R] [--sampling top|random] [--seed 42] [--model DIR]
    accelerate launch --num_processes 2 -m mnr.mine PAIRS --output mined.tsv ...   # same file, encoded in shards

Every query (distinct anchor) is embedded with the model, every corpus text too (the pairs' positives, plus the
texts of --corpus), and the corpus is searched exactly (`mnr.retrieval.top_k`: one block of scores at a time).
The options mean what they mean in sentence-transformers' `mine_hard_negatives`:
  * candidates are the corpus texts by descending cosine, without the anchor's positives, any text identical
    to one of them or to the anchor, ignoring case, spacing and trailing punctuation (`same_text_key`);
  * --margin M drops a candidate scoring above (positive score - M), --relative-margin R one scoring above
    (positive score - |positive score| x R) (the false-negative guard); an anchor with several positives is
    compared with the lowest of their scores;
  * of the candidates left, ranks range_min .. range_max - 1 (0 = the most similar) form the window;
  * --sampling top takes the first k of the window, random k of it drawn with --seed (then sorted by score).
The output (.tsv or .jsonl, optionally .gz) has one row per input pair: anchor, positive and the anchor's
negatives, named `negative` when k = 1 and negative_1 .. negative_k otherwise (the column names of
sentence-transformers' triplet and n-tuple formats).  A pair whose anchor got fewer than k negatives is left out
and counted.  A summary (counts and score statistics) is printed and written to <output>.summary.json.
Prompts and pooling are the model's saved ones, as in training and evaluation, unless --query-prompt,
--document-prompt or --pooling say otherwise.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from mnr import distributed
from mnr.atomic import atomic_file, own_input
from mnr.data import DataError, cell_text, load_examples, read_source, split_specs

logger = logging.getLogger(__name__)

OUTPUT_SUFFIXES = (".tsv", ".jsonl")
QUERY_CHUNK = 1024  # queries scored at once: one (QUERY_CHUNK, DOC_CHUNK) block of float32 scores
DOC_CHUNK = 16384
PERCENTILES = (5, 25, 50, 75, 95)


@dataclass
class MineOptions:
    num_negatives: int = 3
    range_min: int = 0
    range_max: int | None = None  # None: range_min + k (+ 9k more with a margin), as sentence-transformers
    margin: float | None = None
    relative_margin: float | None = None
    sampling: str = "top"
    seed: int = 42

    def window_end(self) -> int:
        if self.range_max is not None:
            return self.range_max
        with_margin = self.margin is not None or self.relative_margin is not None
        return self.range_min + self.num_negatives * (10 if with_margin else 1)

    def check(self) -> None:
        """Raises DataError naming the first bad option."""
        k, end = self.num_negatives, self.window_end()
        problems = [(k >= 1, f"--num-negatives {k}: must be >= 1"),
                    (self.range_min >= 0, f"--range-min {self.range_min}: must be >= 0"),
                    (end > self.range_min, f"--range-max {end}: must be larger than --range-min {self.range_min}"),
                    (k <= end - self.range_min, f"--num-negatives {k}: only {end - self.range_min} candidates fit "
                     f"between --range-min {self.range_min} and --range-max {end}"),
                    (self.margin is None or (math.isfinite(self.margin) and self.margin >= 0),
                     f"--margin {self.margin}: must be a finite number >= 0"),
                    (self.relative_margin is None or 0 <= self.relative_margin < 1,
                     f"--relative-margin {self.relative_margin}: must be in [0, 1)"),
                    (self.sampling in ("top", "random"), f"--sampling {self.sampling!r}: choose top or random")]
        for ok, message in problems:
            if not ok:
                raise DataError(message)


@dataclass
class Problem:
    """The pairs as search input: distinct queries, the de-duplicated corpus, and per query what is excluded."""

    queries: list[str]
    corpus: list[str]
    pair_query: list[int]  # per input pair: its query's index
    pair_positive: list[int]  # per input pair: its positive's corpus index
    excluded: list[list[int]]  # per query: corpus indices never mined (its positives, its own text)
    positives: list[list[int]]  # per query: its positives' corpus indices


def same_text_key(text: str) -> str:
    """Texts with equal keys count as the same text for the exclusions: case, runs of spaces and trailing
    punctuation do not make a positive's copy a negative ("A woman is running." vs "a woman is running")."""
    return " ".join(text.casefold().split()).rstrip(" .!?;,:")


def build_problem(anchors: list[str], positives: list[str], corpus: list[str] = ()) -> Problem:
    """Queries = distinct anchors (first-appearance order); corpus = the positives, then the other corpus texts,
    each text once.  Excluded for a query: every corpus text that is the same text (`same_text_key`) as one of
    its positives or as the query itself."""
    doc_index: dict[str, int] = {}
    for text in [*positives, *corpus]:
        doc_index.setdefault(text, len(doc_index))
    same: dict[str, list[int]] = {}
    for text, d in doc_index.items():
        same.setdefault(same_text_key(text), []).append(d)
    query_index: dict[str, int] = {}
    pair_query = [query_index.setdefault(a, len(query_index)) for a in anchors]
    pair_positive = [doc_index[p] for p in positives]
    query_positives: list[list[int]] = [[] for _ in query_index]
    for q, d in zip(pair_query, pair_positive):
        if d not in query_positives[q]:
            query_positives[q].append(d)
    docs = list(doc_index)
    excluded = [list(dict.fromkeys(d for t in [a, *(docs[i] for i in pos)] for d in same.get(same_text_key(t), [])))
                for a, pos in zip(query_index, query_positives)]
    return Problem(list(query_index), docs, pair_query, pair_positive, excluded, query_positives)


# ---------------------------------------------------------------------------------------------
# search: exact top-K in blocks, sharded by query chunk over the processes


def search(query_emb: torch.Tensor, doc_emb: torch.Tensor, k: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_queries, min(k, n_docs)) scores and corpus indices, best first, ties by ascending corpus index.
    Rows must be normalised.  Every process calls it; each ranks its share of query chunks, all get every row."""
    from mnr.evaluate import sharded
    from mnr.retrieval import top_k

    device = device or query_emb.device
    docs = doc_emb.to(device)
    tie = torch.arange(docs.shape[0])
    chunks = [list(range(s, min(s + QUERY_CHUNK, len(query_emb)))) for s in range(0, len(query_emb), QUERY_CHUNK)]

    def rank(mine: list[list[int]]) -> torch.Tensor | None:
        parts = []
        for idx in mine:
            scores, index = top_k(query_emb[idx[0] : idx[-1] + 1].to(device), docs, tie, k, DOC_CHUNK)
            # one float64 tensor per chunk: float32 scores and indices < 2**53 are both exact in float64
            parts.append(torch.cat([scores.double(), index.double()], dim=1).cpu())
        return torch.cat(parts) if parts else None

    packed = sharded(chunks, rank)
    width = packed.shape[1] // 2
    return packed[:, :width].float(), packed[:, width:].long()


# ---------------------------------------------------------------------------------------------
# selection (pure tensor code: scores in, negatives out)


@dataclass
class Selection:
    negatives: list[list[int]]  # per query: corpus indices, best first (up to k)
    scores: list[list[float]]
    skipped: Counter = field(default_factory=Counter)  # candidates dropped per rule


def _excluded_mask(index: torch.Tensor, excluded: list[list[int]]) -> torch.Tensor:
    """(n, K) True where index[q, j] is one of query q's excluded corpus indices.  Pairs are compared as int64 keys
    q * n_docs + doc (torch.isin sorts them): memory O(n K + excluded), whatever the number of positives."""
    rows = torch.tensor([q for q, ex in enumerate(excluded) for _ in ex], dtype=torch.int64)
    docs = torch.tensor([d for ex in excluded for d in ex], dtype=torch.int64)
    n_docs = max(int(index.max()) if index.numel() else 0, int(docs.max()) if docs.numel() else 0) + 1
    keys = torch.arange(index.shape[0], dtype=torch.int64)[:, None] * n_docs + index
    return torch.isin(keys, rows * n_docs + docs)


def select(scores: torch.Tensor, index: torch.Tensor, positive_min: torch.Tensor, excluded: list[list[int]],
           opts: MineOptions) -> Selection:
    """Negatives per query from its ranked candidates (scores, index: (n, K), best first); positive_min: (n,)
    the lowest positive score of each query (the margin reference, as sentence-transformers)."""
    valid = ~_excluded_mask(index, excluded)
    skipped: Counter = Counter()
    rules = []
    if opts.margin is not None:
        rules.append(("margin", scores > (positive_min - opts.margin)[:, None]))
    if opts.relative_margin is not None:
        rules.append(("relative_margin", scores > (positive_min - positive_min.abs() * opts.relative_margin)[:, None]))
    for name, drop in rules:
        skipped[name] += int((valid & drop).sum())
        valid &= ~drop
    rank = valid.long().cumsum(dim=1) - 1  # rank among the candidates left
    window = valid & (rank >= opts.range_min) & (rank < opts.window_end())
    k = opts.num_negatives
    if opts.sampling == "random":
        gen = torch.Generator().manual_seed(opts.seed)
        keys = torch.rand(window.shape, generator=gen, dtype=torch.float64)
    else:
        keys = torch.arange(window.shape[1], dtype=torch.float64).expand(window.shape).clone()
    keys[~window] = math.inf
    take = torch.sort(torch.sort(keys, dim=1).indices[:, :k], dim=1).values  # chosen columns, best score first
    chosen_ok = window.gather(1, take)
    picked, picked_scores = index.gather(1, take), scores.gather(1, take)
    negatives = [row[ok].tolist() for row, ok in zip(picked, chosen_ok)]
    neg_scores = [row[ok].tolist() for row, ok in zip(picked_scores, chosen_ok)]
    return Selection(negatives, neg_scores, skipped)


# ---------------------------------------------------------------------------------------------
# the whole job on texts (the embedding function is injected: tests pass a toy one)


Embed = Callable[[list[str]], torch.Tensor]  # texts -> (n, d) embeddings (normalised here)


@dataclass
class Mined:
    problem: Problem
    selection: Selection
    positive_scores: list[float]  # per input pair
    rows: list[list[str]]  # anchor, positive, negatives: the pairs whose anchor got k negatives
    summary: dict


def mine(anchors: list[str], positives: list[str], corpus: list[str], embed_queries: Embed, embed_docs: Embed,
         opts: MineOptions, device=None) -> Mined:
    opts.check()
    problem = build_problem(anchors, positives, corpus)
    q = F.normalize(embed_queries(problem.queries).float(), dim=-1)
    d = F.normalize(embed_docs(problem.corpus).float(), dim=-1)
    extra = max(len(e) for e in problem.excluded)  # room for the excluded texts among the retrieved
    scores, index = search(q, d, opts.window_end() + extra, device)
    pair_scores = (q[problem.pair_query] * d[problem.pair_positive]).sum(-1)
    positive_min = torch.full((len(problem.queries),), math.inf)
    positive_min.scatter_reduce_(0, torch.tensor(problem.pair_query), pair_scores, reduce="amin")
    selection = select(scores, index, positive_min, problem.excluded, opts)
    rows = [[a, p] + [problem.corpus[n] for n in selection.negatives[qi]]
            for a, p, qi in zip(anchors, positives, problem.pair_query)
            if len(selection.negatives[qi]) >= opts.num_negatives]
    summary = summarize(problem, selection, pair_scores.tolist(), rows, opts, q.shape[1])
    return Mined(problem, selection, pair_scores.tolist(), rows, summary)


def _stats(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    a = np.asarray(values, dtype=np.float64)
    return {"count": int(a.size), "mean": float(a.mean()), "min": float(a.min()), "max": float(a.max()),
            **{f"p{p}": float(np.percentile(a, p)) for p in PERCENTILES}}


def summarize(problem: Problem, sel: Selection, positive_scores: list[float], rows: list[list[str]],
              opts: MineOptions, dim: int) -> dict:
    k = opts.num_negatives
    short = [i for i, n in enumerate(sel.negatives) if len(n) < k]
    short_set = set(short)
    return {"pairs": len(positive_scores), "queries": len(problem.queries), "corpus": len(problem.corpus),
            "embedding_dim": dim, "num_negatives": k, "range_min": opts.range_min, "range_max": opts.window_end(),
            "margin": opts.margin, "relative_margin": opts.relative_margin, "sampling": opts.sampling,
            "seed": opts.seed, "queries_with_fewer_than_k": len(short),
            "pairs_left_out": sum(1 for qi in problem.pair_query if qi in short_set),
            "rows_written": len(rows), "candidates_skipped": dict(sel.skipped),
            "positive_scores": _stats(positive_scores),
            "negative_scores": _stats([s for row in sel.scores for s in row])}


# ---------------------------------------------------------------------------------------------
# files


def output_negative_columns(k: int) -> list[str]:
    return ["negative"] if k == 1 else [f"negative_{i}" for i in range(1, k + 1)]


def output_kind(path: str) -> str:
    base = path[:-3] if path.endswith(".gz") else path
    for suffix in OUTPUT_SUFFIXES:
        if base.endswith(suffix):
            return suffix[1:]
    raise DataError(f"--output {path}: unknown format; name it *.tsv or *.jsonl (optionally .gz)")


def write_rows(path: str, rows: list[list[str]], k: int) -> None:
    """TSV (no quoting: a text holding a tab or newline is an error, use .jsonl) or JSONL; written aside and
    renamed into place (a failure leaves `path` as it was and raises a one-line WriteError)."""
    header = ["anchor", "positive", *output_negative_columns(k)]
    kind = output_kind(path)
    if kind == "tsv":
        bad = next((t for row in rows for t in row if "\t" in t or "\n" in t or "\r" in t), None)
        if bad is not None:
            raise DataError(f"--output {path}: text {bad[:60]!r} holds a tab or line break; write .jsonl instead")
    opener = gzip.open if path.endswith(".gz") else open
    with atomic_file(path) as tmp, opener(tmp, "wt", encoding="utf-8", newline="") as fh:
        if kind == "tsv":
            fh.write("\t".join(header) + "\n")
            fh.writelines("\t".join(row) + "\n" for row in rows)
        else:
            fh.writelines(json.dumps(dict(zip(header, row)), ensure_ascii=False) + "\n" for row in rows)


def read_corpus(spec: str) -> list[str]:
    """Texts of --corpus: a `text` column, else positive (and negative...) columns, else the only column."""
    texts: list[str] = []
    for one in split_specs(spec):
        columns, rows = read_source(one)
        wanted = (["text"] if "text" in columns else [c for c in columns if c == "positive" or c.startswith("negative")]
                  or (["hypothesis"] if "hypothesis" in columns else columns if len(columns) == 1 else []))
        if not wanted:
            raise DataError(f"{one}: columns found: {', '.join(map(str, columns))}; a corpus needs a 'text' column "
                            f"(or positive/negative columns, or a single column)")
        texts += [t for row in rows for t in (cell_text(row.get(c)) for c in wanted) if t is not None]
    if not texts:
        raise DataError(f"{spec}: the corpus has no text")
    return texts


# ---------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    from mnr.cli import Parser, add_encoding_flags, add_model_flags

    p = Parser(prog="python -m mnr.mine", description=__doc__.splitlines()[0])
    p.add_argument("pairs", help="training pairs: anchor/positive rows or NLI premise/hypothesis/label rows "
                                 "(.tsv/.csv/.jsonl/.parquet[.gz], comma-separated for several)")
    p.add_argument("--output", required=True, help="the mined training file, *.tsv or *.jsonl (optionally .gz)")
    p.add_argument("--corpus", default="", help="more texts to mine from (a 'text' column); the pairs' positives "
                                                "are always part of the corpus")
    p.add_argument("--model", default="", help="local model directory (default: the offline all-MiniLM-L6-v2)")
    p.add_argument("--num-negatives", type=int, default=3, help="negatives per anchor, k (default 3)")
    p.add_argument("--range-min", type=int, default=0, help="skip the first this many candidates (default 0)")
    p.add_argument("--range-max", type=int, default=None,
                   help="consider candidates up to this rank (default: range-min + k, or + 10k with a margin)")
    p.add_argument("--margin", type=float, default=None,
                   help="absolute margin: keep a negative only if its score <= positive score - margin")
    p.add_argument("--relative-margin", type=float, default=None,
                   help="keep a negative only if its score <= positive score - |positive score| x this (e.g. 0.05)")
    p.add_argument("--sampling", default="top", help="top (the k best of the window) or random (k of the window)")
    p.add_argument("--seed", type=int, default=42, help="seed of --sampling random (default 42)")
    add_encoding_flags(p)
    add_model_flags(p, renamed={"--prompt": "--query-prompt"})
    return p


def _options(args) -> MineOptions:
    from mnr.cli import check_encoding_flags
    from mnr.config import check_seed

    opts = MineOptions(args.num_negatives, args.range_min, args.range_max, args.margin, args.relative_margin,
                       args.sampling, args.seed)
    opts.check()
    check_encoding_flags(args)
    check_seed(args.seed, "--seed")
    output_kind(args.output)
    if os.path.isdir(args.output):
        raise DataError(f"--output {args.output}: is a directory")
    inputs = [s for spec in (args.pairs, args.corpus) if spec for s in split_specs(spec)]
    for written in (args.output, f"{args.output}.summary.json"):
        clash = own_input(written, inputs)  # by device and inode: a link to an input is the input
        if clash is not None:
            raise DataError(f"--output {args.output}: {written} is the input {clash} (it would be replaced); "
                            f"write the mined file to another path")
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):  # found now, not after the mining
        raise DataError(f"--output {args.output}: {folder} is not a writable directory")
    return opts


def _encoder_embed(args, device):
    """(embed queries, embed documents) through the model, sharded over the processes; the prompts and the
    pooling are the model's saved ones unless given."""
    from mnr.backbone import DOCUMENT, QUERY, Backbone
    from mnr.cli import check_fits, check_prompt_room
    from mnr.evaluate import encode_sharded

    backbone = Backbone.load(args.model, args.max_seq_length or 128, args.trust_remote_code, pooling=args.pooling,
                             query_prompt=args.query_prompt, document_prompt=args.document_prompt,
                             include_prompt=args.include_prompt)
    max_seq_length = check_fits(args.max_seq_length, backbone.encoder)
    check_prompt_room(backbone.policy.at_length(max_seq_length), [(backbone.policy.query_prompt,
                                                                 backbone.policy.document_prompt)])
    backbone.encoder.to(device)

    def embed(role: str) -> Embed:
        return lambda texts: encode_sharded(backbone, texts, max_seq_length, args.batch_size, device, role)

    return embed(QUERY), embed(DOCUMENT)


def print_summary(summary: dict, output: str) -> None:
    s = summary
    print(f"mined {output}: {s['rows_written']} rows from {s['pairs']} pairs ({s['queries']} queries, corpus "
          f"{s['corpus']} texts), k={s['num_negatives']}, ranks {s['range_min']}..{s['range_max'] - 1}, "
          f"sampling {s['sampling']}")
    print(f"queries with fewer than k negatives: {s['queries_with_fewer_than_k']} "
          f"({s['pairs_left_out']} pairs left out); candidates skipped: {s['candidates_skipped'] or 'none'}")
    for name in ("positive_scores", "negative_scores"):
        st = s[name]
        if st:
            print(f"{name.replace('_', ' ')}: mean {st['mean']:.4f} min {st['min']:.4f} max {st['max']:.4f} "
                  + " ".join(f"p{p} {st[f'p{p}']:.4f}" for p in PERCENTILES) + f" (n={st['count']})")
    print(f"throughput: {s['texts_per_s']:.1f} texts/s ({s['seconds']:.1f} s, {s['processes']} process(es))")


def run(args, device) -> dict:
    import time

    opts = _options(args)
    examples, stats = load_examples(args.pairs, hard_negatives=False)
    corpus = read_corpus(args.corpus) if args.corpus else []
    logger.info("pairs %s: %s", args.pairs, stats.summary())
    embed_queries, embed_docs = _encoder_embed(args, device)
    start = time.perf_counter()
    result = mine(examples.anchors, examples.positives, corpus, embed_queries, embed_docs, opts, device)
    seconds = time.perf_counter() - start
    n_texts = len(result.problem.queries) + len(result.problem.corpus)
    summary = {**result.summary, "pairs_read": stats.summary(), "seconds": seconds, "texts_per_s": n_texts / seconds,
               "processes": distributed.world_size(), "output": os.path.basename(args.output)}

    def write() -> None:
        write_rows(args.output, result.rows, opts.num_negatives)
        with atomic_file(f"{args.output}.summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=2), encoding="utf-8")
        print_summary(summary, args.output)

    distributed.run_on_main(write)
    return summary


def main(argv: list[str] | None = None) -> int:
    from mnr import cli

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    def body() -> int:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if distributed.launched_world_size() > 1:  # launched as N processes: one process group, shards
            from accelerate import Accelerator

            device = Accelerator(cpu=not torch.cuda.is_available()).device
        run(args, device)
        return 0

    return cli.run(body)


if __name__ == "__main__":
    sys.exit(main())
