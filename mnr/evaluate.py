"""Evaluation: STS Spearman and retrieval metrics (nDCG, MRR, MAP, recall, accuracy), on every process.

    python -m mnr.evaluate CHECKPOINT --data A --data B [--json]     # or --data A,B; no --data: the embedded sets
    accelerate launch --num_processes 2 -m mnr.evaluate CHECKPOINT --data A   # same numbers, encoded in shards

`build_evaluators(spec)` turns an `--eval-data` string into evaluators; the kind of each set is detected from
the data (docs/evaluation.md):
  * STS pairs (sentence1, sentence2, score): Spearman x100 of the cosine;
  * a BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv; `DIR@split` picks a split);
  * anchor, positive[, negative] rows, or NLI rows, turned into retrieval (mnr/retrieval.py).
Every function takes a mnr.backbone.Backbone and tokenises and pads as its TokenPolicy says.  Prompts: the
policy's query prompt goes before every retrieval query and, for the symmetric STS pairs, before both sentences
(the convention of E5/BGE-style models: the query prompt for symmetric tasks); its document prompt before every
corpus document.
Every process calls every evaluator: the texts are encoded in shards across processes and the retrieval scores
computed in shards by query, then gathered through mnr/distributed.py, so all processes return the same dict,
equal to the single-process one.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from mnr import distributed
from mnr.data import DataError, cell_text, read_source
from mnr.matryoshka import cut, label
from mnr.reporting import json_ready
from mnr.retrieval import (MAX_K, RetrievalData, is_beir_dir, load_beir, metric_names, nli_rows_as_retrieval,
                           pair_rows_as_retrieval, retrieval_metrics, split_beir_spec, sts_as_retrieval, top_k)

logger = logging.getLogger(__name__)

RESOURCES = Path(__file__).resolve().parent / "resources"
EMBEDDED_STS = RESOURCES / "stsb_validation.tsv"
DEMO_MIN_SCORE = 4.0  # STSb pairs scored at least this are "relevant" in the embedded retrieval sanity set


@dataclass
class STSData:
    sentences1: list[str]
    sentences2: list[str]
    scores: np.ndarray
    skipped: int = 0


def load_sts(spec: str) -> STSData:
    """Pairs with a gold similarity score: columns sentence1, sentence2 and score (or label, as in glue/stsb)."""
    if spec.strip() in ("glue/stsb", "stsb"):
        spec = "glue/stsb@validation"
    columns, rows = read_source(spec)
    return _sts_from_rows(spec, columns, rows)


def _is_sts(columns) -> bool:
    return {"sentence1", "sentence2"} <= set(columns) and bool({"score", "label"} & set(columns))


def _sts_from_rows(spec: str, columns: list[str], rows) -> STSData:
    if not _is_sts(columns):
        raise DataError(f"{spec}: columns found: {', '.join(map(str, columns))}; expected sentence1, sentence2, score")
    score_col = "score" if "score" in columns else "label"
    s1, s2, scores, skipped = [], [], [], 0
    for row in rows:
        a, b = cell_text(row.get("sentence1")), cell_text(row.get("sentence2"))  # None: empty, missing or not Unicode
        try:
            score = float(row.get(score_col))
        except (TypeError, ValueError):
            score = float("nan")
        if a is None or b is None or not np.isfinite(score):
            skipped += 1
            continue
        s1.append(a)
        s2.append(b)
        scores.append(score)
    if len(scores) < 2:
        raise DataError(f"{spec}: fewer than 2 usable STS pairs ({skipped} bad rows skipped)")
    if skipped:
        logger.warning("%s: skipped %d rows with an empty, non-text or non-Unicode sentence or a non-numeric score",
                       spec, skipped)
    return STSData(s1, s2, np.asarray(scores, dtype=np.float64), skipped)


def _length_batches(texts: list[str], batch_size: int) -> list[list[int]]:
    """Indices of the texts sorted by length (for less padding), cut into batches."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


@torch.no_grad()
def _embed_batches(backbone, texts: list[str], batches: list[list[int]], max_seq_length: int,
                   device, role: str | None = None) -> torch.Tensor | None:
    """Float32 CPU embeddings of the given batches of text indices, concatenated in batch order (None if none);
    tokenised (with the prompt of `role`) and padded as the backbone's TokenPolicy says, cut at max_seq_length."""
    if not batches:
        return None
    encoder, policy = backbone.encoder, backbone.policy.at_length(max_seq_length)
    device = device or next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    out = []
    for idx in batches:
        batch = {k: v.to(device) for k, v in policy.batch([texts[i] for i in idx], role).items()}
        out.append(encoder(batch["input_ids"], batch["attention_mask"], batch.get("prompt_lengths")).float().cpu())
    encoder.train(was_training)
    return torch.cat(out)


def _in_item_order(batches: list[list[int]], rows: torch.Tensor) -> torch.Tensor:
    """Rows computed batch after batch -> rows in item order."""
    out = torch.empty_like(rows)
    out[torch.tensor([i for idx in batches for i in idx], dtype=torch.int64)] = rows
    return out


def encode(backbone, texts: list[str], max_seq_length: int = 128, batch_size: int = 64,
           device: torch.device | str | None = None, role: str | None = None) -> torch.Tensor:
    """(n, d) float32 embeddings (not normalised) of `texts` as queries or documents (`role`: the policy puts
    its prompt first; None: as given) in input order, on this process alone; batches sorted by length (a prompt
    in front does not change the order).  `backbone`: a mnr.backbone.Backbone."""
    batches = _length_batches(texts, batch_size)
    return _in_item_order(batches, _embed_batches(backbone, texts, batches, max_seq_length, device, role))


def sharded(batches: list[list[int]], compute: Callable[[list[list[int]]], torch.Tensor | None]) -> torch.Tensor:
    """Process r computes batches r, r+N, r+2N, ... (`compute` gets a list of batches and returns their rows in
    batch order, one per item, or None for no batches); every process gets all rows, in item order.  Each batch is
    computed exactly as a single process would compute it, so the result does not depend on the number of processes.
    Every process computes the same number of batches, ceil(n / N): one with a batch fewer also computes a copy of
    the first batch and drops its rows, so collectives inside `compute` (sharded parameters) stay in step."""
    world, rank = distributed.world_size(), distributed.rank()
    mine = batches[rank::world]
    filler = [batches[0]] * (-(-len(batches) // world) - len(mine))
    rows = compute(mine + filler)
    if filler and rows is not None:
        rows = rows[: rows.shape[0] - len(batches[0])] if mine else None
    parts = distributed.all_gather_rows(rows)
    order = [b for r in range(world) for b in batches[r::world]]
    return _in_item_order(order, torch.cat(parts))


def encode_sharded(backbone, texts: list[str], max_seq_length: int = 128, batch_size: int = 64,
                   device: torch.device | str | None = None, role: str | None = None) -> torch.Tensor:
    """`encode`, with the batches shared out over all processes (every process must call it); each gets all
    (n, d) embeddings, the same as `encode` on one process (same batches, so the same padding)."""
    return sharded(_length_batches(texts, batch_size),
                   lambda mine: _embed_batches(backbone, texts, mine, max_seq_length, device, role))


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def sts_spearman(backbone, data: STSData, max_seq_length: int = 128, batch_size: int = 64,
                 encode_fn: Callable = encode) -> float:
    """Spearman x 100 of cos(emb(sentence1), emb(sentence2)) against the gold scores (both sides with the
    query prompt)."""
    texts, emb = _sts_embeddings(backbone, data, max_seq_length, batch_size, encode_fn)
    return _spearman_of(texts, F.normalize(emb, dim=-1), data)


def _sts_embeddings(backbone, data: STSData, max_seq_length: int, batch_size: int,
                    encode_fn: Callable) -> tuple[list[str], torch.Tensor]:
    texts = list(dict.fromkeys(data.sentences1 + data.sentences2))
    return texts, encode_fn(backbone, texts, max_seq_length, batch_size, role="query")


def _spearman_of(texts: list[str], emb: torch.Tensor, data: STSData) -> float:
    """Spearman x 100 of the cosine of normalised embeddings of the distinct texts."""
    pos = {t: i for i, t in enumerate(texts)}
    a = emb[[pos[t] for t in data.sentences1]]
    b = emb[[pos[t] for t in data.sentences2]]
    cosine = (a * b).sum(dim=-1).numpy()
    return 100.0 * spearman(cosine, data.scores)


# ---------------------------------------------------------------------------------------------
# evaluators: one interface for the trainer and the CLI


@dataclass
class Evaluator:
    """`name` (unique within a list), `kind`, `main_metric` (a key of the result); call on every process."""

    name: str
    kind: str
    main_metric: str
    source: str
    max_seq_length: int = 128
    batch_size: int = 64
    dims: tuple[int, ...] = ()  # Matryoshka: also score the first d coordinates, re-normalised (mnr/matryoshka.py)

    def describe(self) -> str:
        raise NotImplementedError

    def by_dim(self, backbone) -> dict[int | None, dict[str, float]]:
        """{None: metrics of the full embedding, d: metrics of its first d coordinates for each of `dims`}."""
        raise NotImplementedError

    def scores(self, backbone) -> dict[str, float]:
        """Every metric under its key: `name/metric` (full embedding), `name@d/metric` (first d coordinates)."""
        return {f"{label(self.name, dim)}/{metric}": value
                for dim, res in self.by_dim(backbone).items() for metric, value in res.items()}


@dataclass
class STSEvaluator(Evaluator):
    data: STSData | None = None

    def describe(self) -> str:
        skips = f"; skipped: {self.data.skipped} rows with empty text or a non-numeric score" if self.data.skipped else ""
        return f"STS Spearman x100, {self.name} ({self.source}): {len(self.data.scores)} pairs{skips}"

    def by_dim(self, backbone) -> dict[int | None, dict[str, float]]:
        texts, emb = _sts_embeddings(backbone, self.data, self.max_seq_length, self.batch_size,
                                     encode_sharded)
        return {dim: {"spearman": _spearman_of(texts, cut(emb, dim), self.data)} for dim in (None, *self.dims)}


@dataclass
class RetrievalEvaluator(Evaluator):
    data: RetrievalData | None = None
    query_chunk: int = 1024  # queries scored at once: memory (query_chunk x doc_chunk) floats

    def describe(self) -> str:
        return f"retrieval, {self.name} ({self.source}): {self.data.summary()}"

    def by_dim(self, backbone) -> dict[int | None, dict[str, float]]:
        args = (self.max_seq_length, self.batch_size)
        queries = encode_sharded(backbone, self.data.queries, *args, role="query")
        docs = encode_sharded(backbone, self.data.corpus, *args, role="document")
        device = next(backbone.encoder.parameters()).device
        return {dim: self._rank(cut(queries, dim), cut(docs, dim).to(device), device) for dim in (None, *self.dims)}

    def _rank(self, queries: torch.Tensor, docs: torch.Tensor, device) -> dict[str, float]:
        chunks = [list(range(s, min(s + self.query_chunk, len(self.data.queries))))
                  for s in range(0, len(self.data.queries), self.query_chunk)]

        def rank_chunks(mine: list[list[int]]) -> torch.Tensor | None:
            hits = [top_k(queries[idx[0] : idx[-1] + 1].to(device), docs, self.data.tie_rank, MAX_K)[1].cpu()
                    for idx in mine]
            return torch.cat(hits) if hits else None

        ranked = sharded(chunks, rank_chunks)  # (n_queries, min(100, n_docs)) corpus indices, best first
        return retrieval_metrics(ranked.tolist(), self.data.relevant)


def build_evaluators(spec: str | list[str], max_seq_length: int = 128, batch_size: int = 64,
                     dims: tuple[int, ...] = ()) -> list[Evaluator]:
    """`--eval-data` -> evaluators.  '' = the embedded sets (STSb validation, and the retrieval sanity set built
    from it: `embedded_retrieval`), 'none' = [].  dims: truncated sizes each evaluator also scores (below the
    model's width, `matryoshka.truncated_dims`).  Raises DataError naming the set on bad input."""
    if isinstance(spec, str):
        if spec.strip().lower() == "none":
            return []
        specs = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        specs = [s.strip() for s in spec if s.strip()]
    evaluators: list[Evaluator] = []
    names: Counter = Counter()
    common = dict(max_seq_length=max_seq_length, batch_size=batch_size, dims=tuple(dims))
    for one in specs or [""]:
        for ev in _evaluators_of(one, common):
            names[ev.name] += 1
            if names[ev.name] > 1:
                ev.name = f"{ev.name}_{names[ev.name]}"
            evaluators.append(ev)
    return evaluators


def metric_choices(evaluators: list[Evaluator]) -> list[str]:
    """Every "evaluator/metric" the evaluators report, each evaluator's main metric first (higher is better); with
    dims, each size's as "evaluator@d/metric" after the full embedding's."""
    out = []
    for ev in evaluators:
        names = ["spearman"] if ev.kind == "sts" else metric_names()
        for name in [label(ev.name, dim) for dim in (None, *ev.dims)]:
            out += [f"{name}/{ev.main_metric}"] + [f"{name}/{m}" for m in names if m != ev.main_metric]
    return out


def embedded_retrieval(sts: STSData, source: str = str(EMBEDDED_STS)) -> RetrievalData:
    """The retrieval sanity set shipped with mnr: STSb validation pairs scored >= 4 as query -> relevant document,
    every other sentence2 of the file as a distractor (mnr/retrieval.py `sts_as_retrieval`)."""
    return sts_as_retrieval(source, sts.sentences1, sts.sentences2, sts.scores, DEMO_MIN_SCORE)


def _evaluators_of(spec: str, common: dict) -> list[Evaluator]:
    if not spec:
        sts = load_sts(str(EMBEDDED_STS))
        return [STSEvaluator("stsb_validation", "sts", "spearman", str(EMBEDDED_STS), data=sts, **common),
                RetrievalEvaluator("stsb_retrieval", "retrieval", "ndcg@10",
                                   f"{EMBEDDED_STS} (pairs scored >= {DEMO_MIN_SCORE:g})",
                                   data=embedded_retrieval(sts), **common)]
    name = _short_name(spec)
    if is_beir_dir(spec):
        return [RetrievalEvaluator(name, "retrieval", "ndcg@10", spec, data=load_beir(spec), **common)]
    if spec in ("glue/stsb", "stsb"):
        return [STSEvaluator("stsb_validation", "sts", "spearman", spec, data=load_sts(spec), **common)]
    columns, rows = read_source(spec)
    cols = set(columns)
    if _is_sts(columns):
        return [STSEvaluator(name, "sts", "spearman", spec, data=_sts_from_rows(spec, columns, rows), **common)]
    if {"premise", "hypothesis", "label"} <= cols:
        data = nli_rows_as_retrieval(spec, rows)
    elif {"anchor", "positive"} <= cols:
        data = pair_rows_as_retrieval(spec, columns, rows)
    else:
        raise DataError(f"{spec}: columns found: {', '.join(map(str, columns)) or '(none)'}; expected sentence1, "
                        f"sentence2, score (STS), anchor, positive[, negative] or premise, hypothesis, label "
                        f"(retrieval), or a BEIR folder (corpus.jsonl, queries.jsonl, qrels/)")
    return [RetrievalEvaluator(name, "retrieval", "ndcg@10", spec, data=data, **common)]


def _short_name(spec: str) -> str:
    """A file or folder's name without suffixes; a split-like name (train, dev, test...) keeps its folder's name."""
    folder, split = split_beir_spec(spec)
    path = Path(folder.rstrip("/"))
    stem = path.name
    for suffix in (".gz", ".tsv", ".csv", ".jsonl", ".parquet"):
        stem = stem[: -len(suffix)] if stem.endswith(suffix) else stem
    if stem.lower() in ("train", "dev", "validation", "val", "test") and path.parent.name:
        stem = f"{path.parent.name}_{stem}"
    if split and os.path.isdir(folder):
        stem = f"{stem}_{split}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_") or "eval"


# ---------------------------------------------------------------------------------------------
# command line


def _print_results(model: str, evaluators: list[Evaluator], results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"mnr.evaluate {model}")
    for column in ("set", "kind", "dim", "metric", "value"):
        table.add_column(column, justify="right" if column in ("value", "dim") else "left")
    for ev, by_dim in zip(evaluators, results):
        for j, (dim, res) in enumerate(by_dim.items()):
            for i, (metric, value) in enumerate(res.items()):
                shown = f"{value:.2f}" if ev.kind == "sts" else f"{value:.4f}"
                name = f"{metric} (main)" if metric == ev.main_metric else metric
                first = i == 0 and j == 0
                table.add_row(ev.name if first else "", ev.kind if first else "",
                              ("full" if dim is None else str(dim)) if i == 0 else "", name, shown)
        table.add_section()
    Console(width=110).print(table)


def build_parser() -> argparse.ArgumentParser:
    from mnr.cli import Parser, add_encoding_flags, add_model_flags

    parser = Parser(prog="python -m mnr.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="model directory (or hub id) to evaluate")
    parser.add_argument("--data", action="append", default=[],
                        help="an evaluation set (repeat, or comma-separate): STS pairs, a BEIR folder (DIR or "
                             "DIR@split), anchor/positive[/negative] or NLI rows; none given: the embedded sets")
    parser.add_argument("--eval-dims", default=None,
                        help="Matryoshka: comma-separated embedding sizes to score too, each on the first d "
                             "coordinates re-normalised, e.g. 384,128,32 (default: the sizes the model was trained "
                             "at, recorded in its export; none recorded: the full size only)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    add_encoding_flags(parser)
    add_model_flags(parser)
    return parser


def _setup(args) -> tuple[list[Evaluator], object]:
    """Evaluators (with their Matryoshka sizes) and the model; a ValueError naming the input on bad input."""
    from mnr.backbone import Backbone
    from mnr.cli import check_encoding_flags, check_fits, check_prompt_room
    from mnr.config import ConfigError, parse_dims
    from mnr.matryoshka import trained_dims, truncated_dims

    check_encoding_flags(args)
    dims = parse_dims(args.eval_dims) if args.eval_dims is not None else trained_dims(args.checkpoint)
    evaluators = build_evaluators(",".join(args.data), batch_size=args.batch_size)
    if not evaluators:
        raise ConfigError("--data none: nothing to evaluate")
    backbone = Backbone.load(args.checkpoint, args.max_seq_length or 128, args.trust_remote_code,
                             pooling=args.pooling, query_prompt=args.query_prompt,
                             document_prompt=args.document_prompt, include_prompt=args.include_prompt)
    max_seq_length = check_fits(args.max_seq_length, backbone.encoder)
    check_prompt_room(backbone.policy.at_length(max_seq_length), [(backbone.policy.query_prompt,
                                                                 backbone.policy.document_prompt)])
    width = getattr(backbone.config, "hidden_size", None)
    for ev in evaluators:
        ev.max_seq_length = max_seq_length
        ev.dims = truncated_dims(dims, width) if width else ()
    return evaluators, backbone


def main(argv: list[str] | None = None) -> int:
    from mnr import cli

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    return cli.run(lambda: _evaluate(args))


def _evaluate(args) -> int:
    device = None
    if distributed.launched_world_size() > 1:  # launched as N processes: one process group, shards
        from accelerate import Accelerator

        device = Accelerator(cpu=not torch.cuda.is_available()).device
    evaluators, backbone = _setup(args)
    backbone.encoder.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    results = [ev.by_dim(backbone) for ev in evaluators]
    if distributed.is_main():
        if args.json:
            pipe = backbone.pipeline
            # a score that is not a number (NaN: Spearman over constant scores) is null: JSON has no NaN
            print(json.dumps(json_ready({
                "model": args.checkpoint, "processes": distributed.world_size(), "pooling": pipe.pooling,
                "query_prompt": pipe.query_prompt, "document_prompt": pipe.document_prompt,
                "include_prompt": pipe.include_prompt, "results": {label(ev.name, dim): {"kind": ev.kind, "main_metric": ev.main_metric,
                                                   **({"dim": dim} if dim else {}), **res}
                            for ev, by_dim in zip(evaluators, results) for dim, res in by_dim.items()}}),
                allow_nan=False))
        else:
            for ev in evaluators:
                print(ev.describe())
            _print_results(args.checkpoint, evaluators, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
