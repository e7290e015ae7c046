"""Retrieval sets and their metrics: loading (BEIR layout, pairs/triplets, NLI, STS pairs), exact top-k search in
bounded memory, and nDCG / MRR / MAP / recall / accuracy.

Pure data and tensor code: no model, no process group (`mnr/evaluate.py` encodes and shards).

Rules, stated once:
  * relevance: a qrels line with score > 0 makes the document relevant, with gain = score (graded nDCG, linear
    gain as in BEIR/pytrec_eval); score <= 0 means "judged not relevant".  Recall, MRR, MAP and accuracy use
    binary relevance (score > 0).
  * queries without any relevant document are not scored (left out of every average, as sentence-transformers'
    InformationRetrievalEvaluator does) and counted in the set's skips.
  * ties: documents with equal scores are ranked by ascending corpus id (string order), the rule of
    sentence-transformers; ids we make up (pairs, NLI) are zero-padded so that this is the order of first
    appearance.
  * MAP@k divides by min(k, number of relevant documents) (sentence-transformers; BEIR's map_cut divides by the
    number of relevant documents: the two differ only for queries with more than k relevant documents).
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from mnr.data import ENTAILMENT, MALFORMED, NEUTRAL, DataError, cell_text, nli_label, read_local

K_VALUES = {"ndcg": (10,), "mrr": (10,), "map": (100,), "recall": (1, 10, 100), "accuracy": (1,)}
MAX_K = 100


@dataclass
class RetrievalData:
    """Queries, corpus and, per query, its relevant documents as {corpus index: gain > 0}."""

    query_ids: list[str]
    queries: list[str]
    corpus_ids: list[str]
    corpus: list[str]
    relevant: list[dict[int, float]]
    skipped: Counter = field(default_factory=Counter)

    def __post_init__(self):
        # rank of each corpus id in string order: the tie key (see the module docstring)
        order = sorted(range(len(self.corpus_ids)), key=self.corpus_ids.__getitem__)
        self.tie_rank = torch.empty(len(order), dtype=torch.int64)
        self.tie_rank[torch.tensor(order, dtype=torch.int64)] = torch.arange(len(order))

    def summary(self) -> str:
        skips = ", ".join(f"{n} {why}" for why, n in sorted(self.skipped.items()))
        n_rel = sum(len(r) for r in self.relevant)
        return (f"{len(self.queries)} queries, {len(self.corpus)} documents, {n_rel} relevant pairs"
                + (f"; skipped: {skips}" if skips else ""))


def _finish(source: str, query_ids, queries, corpus_ids, corpus, relevant, skipped: Counter) -> RetrievalData:
    """Drop queries without relevant documents (counted) and check that something is left to score."""
    if not corpus:
        raise DataError(f"{source}: the corpus is empty")
    keep = [i for i, rel in enumerate(relevant) if rel]
    if len(keep) < len(queries):
        skipped["queries without relevant documents (not scored)"] += len(queries) - len(keep)
    if not keep:
        why = "".join(f"; {n} {reason}" for reason, n in skipped.items()
                      if reason != "queries without relevant documents (not scored)")
        raise DataError(f"{source}: no query has a relevant document in the corpus ({len(queries)} queries with "
                        f"judgements{why})")
    return RetrievalData([query_ids[i] for i in keep], [queries[i] for i in keep], corpus_ids, corpus,
                         [relevant[i] for i in keep], skipped)


# ---------------------------------------------------------------------------------------------
# BEIR layout: corpus.jsonl, queries.jsonl, qrels/<split>.tsv


def split_beir_spec(spec: str) -> tuple[str, str | None]:
    """'DIR' or 'DIR@split' -> (DIR, split or None)."""
    if "@" in spec and not os.path.isdir(spec):
        folder, split = spec.rsplit("@", 1)
        return folder, split or None
    return spec, None


def is_beir_dir(spec: str) -> bool:
    return os.path.isdir(split_beir_spec(spec.strip())[0])


def _beir_file(folder: Path, stem: str) -> str:
    for name in (f"{stem}.jsonl", f"{stem}.jsonl.gz"):
        if (folder / name).is_file():
            return str(folder / name)
    raise DataError(f"{folder}: no {stem}.jsonl (a BEIR folder holds corpus.jsonl, queries.jsonl and qrels/<split>.tsv)")


def _read_id_text(path: str, with_title: bool, skipped: Counter, what: str) -> tuple[list[str], list[str]]:
    _, rows = read_local(path)
    ids, texts, seen = [], [], {}
    for line_no, row in enumerate(rows, 1):
        if row.get(MALFORMED):
            raise DataError(f"{path}: record {line_no}: {row[MALFORMED]}")
        if row.get("_id") is None:
            raise DataError(f"{path}: record {line_no} has no _id")
        rid = str(row["_id"])
        if rid in seen:
            raise DataError(f"{path}: duplicate _id {rid!r} (records {seen[rid]} and {line_no})")
        seen[rid] = line_no
        text = cell_text(row.get("text"))
        title = cell_text(row.get("title")) if with_title else None
        if title and text:  # BEIR's convention for sentence encoders: title, a space, text
            text = f"{title} {text}"
        text = text or title
        if text is None:
            skipped[f"{what} without text"] += 1
            continue
        ids.append(rid)
        texts.append(text)
    return ids, texts


def load_beir(spec: str) -> RetrievalData:
    """A BEIR/MTEB folder; `DIR@split` picks qrels/<split>.tsv (needed only when there are several)."""
    folder_name, split = split_beir_spec(spec.strip())
    folder = Path(folder_name)
    qrels_dir = folder / "qrels"
    splits = sorted(p.name[: -len(".tsv")] for p in qrels_dir.glob("*.tsv")) if qrels_dir.is_dir() else []
    if not splits:
        raise DataError(f"{folder}: no qrels/<split>.tsv (a BEIR folder holds corpus.jsonl, queries.jsonl and qrels/)")
    if split is None:
        if len(splits) > 1:
            raise DataError(f"{folder}: several qrels splits ({', '.join(splits)}); choose one as {folder}@SPLIT")
        split = splits[0]
    if split not in splits:
        raise DataError(f"{folder}: no qrels/{split}.tsv; splits found: {', '.join(splits)}")
    skipped: Counter = Counter()
    corpus_ids, corpus = _read_id_text(_beir_file(folder, "corpus"), True, skipped, "documents")
    query_ids, queries = _read_id_text(_beir_file(folder, "queries"), False, skipped, "queries")
    if not corpus:
        raise DataError(f"{folder}: the corpus is empty")
    doc_index = {d: i for i, d in enumerate(corpus_ids)}
    query_index = {q: i for i, q in enumerate(query_ids)}
    qrels_path = str(qrels_dir / f"{split}.tsv")
    columns, rows = read_local(qrels_path)
    if not {"query-id", "corpus-id", "score"} <= set(columns):
        raise DataError(f"{qrels_path}: columns found: {', '.join(columns)}; expected query-id, corpus-id, score")
    relevant: list[dict[int, float]] = [{} for _ in query_ids]
    judged: set[int] = set()
    for row in rows:
        try:
            qid, did, score = row["query-id"].strip(), row["corpus-id"].strip(), float(row["score"])
        except (AttributeError, KeyError, TypeError, ValueError):
            skipped["malformed qrels lines"] += 1
            continue
        if row.get(MALFORMED) or not np.isfinite(score):
            skipped["malformed qrels lines"] += 1
        elif qid not in query_index:
            skipped["qrels lines naming an unknown query id"] += 1
        elif did not in doc_index:
            skipped["qrels lines naming an unknown corpus id"] += 1
        else:
            judged.add(query_index[qid])
            if score > 0:
                relevant[query_index[qid]][doc_index[did]] = score
    # a query absent from this split's qrels is not part of the split: not a skip worth reporting
    judged = sorted(judged)
    return _finish(f"{folder} ({split})", [query_ids[i] for i in judged], [queries[i] for i in judged], corpus_ids,
                   corpus, [relevant[i] for i in judged], skipped)


# ---------------------------------------------------------------------------------------------
# pairs / triplets / NLI / STS pairs turned into retrieval


def pairs_as_retrieval(source: str, queries_and_docs: Iterable[tuple[str, str, bool]],
                       skipped: Counter | None = None, distractors: Iterable[str] = ()) -> RetrievalData:
    """(query text, document text, relevant?) triples -> queries = distinct query texts, corpus = every distinct
    document text, relevant = the documents paired with the query as relevant.  A document equal to its query is
    dropped (counted): it would match itself."""
    skipped = skipped if skipped is not None else Counter()
    query_pos: dict[str, int] = {}
    doc_pos: dict[str, int] = {}
    relevant: list[dict[int, float]] = []
    for query, doc, is_relevant in queries_and_docs:
        if query == doc:
            skipped["document equal to its query"] += 1
            continue
        q = query_pos.setdefault(query, len(query_pos))
        if q == len(relevant):
            relevant.append({})
        d = doc_pos.setdefault(doc, len(doc_pos))
        if is_relevant:
            relevant[q][d] = 1.0
    for doc in distractors:
        doc_pos.setdefault(doc, len(doc_pos))
    width = len(str(max(len(query_pos), len(doc_pos))))
    return _finish(source, [f"q{i:0{width}d}" for i in range(len(query_pos))], list(query_pos),
                   [f"d{i:0{width}d}" for i in range(len(doc_pos))], list(doc_pos), relevant, skipped)


def pair_rows_as_retrieval(source: str, columns: list[str], rows: Iterable[dict]) -> RetrievalData:
    """anchor, positive[, negative] rows: queries = distinct anchors, corpus = every positive and negative,
    relevant = the anchor's positives.  Rows with an empty anchor or positive are counted skips."""
    skipped: Counter = Counter()

    def triples():
        for row in rows:
            anchor, positive = cell_text(row.get("anchor")), cell_text(row.get("positive"))
            if row.get(MALFORMED) or anchor is None or positive is None:
                skipped["rows with empty or missing text"] += 1
                continue
            yield anchor, positive, True
            negative = cell_text(row.get("negative"))
            if negative is not None:
                yield anchor, negative, False

    return pairs_as_retrieval(source, triples(), skipped)


def nli_rows_as_retrieval(source: str, rows: Iterable[dict]) -> RetrievalData:
    """premise, hypothesis, label rows: queries = premises, corpus = every entailment and contradiction
    hypothesis, relevant = the premise's entailments.  Neutral hypotheses are left out (neither clearly relevant
    nor clearly not); rows with an unknown label or empty text are counted skips."""
    skipped: Counter = Counter()

    def triples():
        for row in rows:
            label = nli_label(row.get("label"))
            premise, hypothesis = cell_text(row.get("premise")), cell_text(row.get("hypothesis"))
            if row.get(MALFORMED) or label is None or premise is None or hypothesis is None:
                skipped["rows with empty text or no usable label"] += 1
            elif label == NEUTRAL:
                skipped["neutral hypotheses (left out)"] += 1
            else:
                yield premise, hypothesis, label == ENTAILMENT

    return pairs_as_retrieval(source, triples(), skipped)


def sts_as_retrieval(source: str, sentences1: list[str], sentences2: list[str], scores: np.ndarray,
                     min_score: float = 4.0) -> RetrievalData:
    """STS pairs as a retrieval sanity set: queries = sentence1 of pairs scored >= min_score, corpus = every
    sentence2 of the file, relevant = the query's sentence2s scored >= min_score (the others are distractors)."""
    rated = [(a, b, s >= min_score) for a, b, s in zip(sentences1, sentences2, scores)]
    queries = {a for a, _, good in rated if good}
    skipped: Counter = Counter()
    docs = [(a, b, good) for a, b, good in rated if b not in queries]  # a query in the corpus would match itself
    if len(docs) < len(rated):
        skipped["documents that are also queries"] += len(rated) - len(docs)
    # a sentence1 without a good pair is no query: its sentence2 stays in the corpus as a distractor only
    return pairs_as_retrieval(source, [t for t in docs if t[0] in queries], skipped,
                              distractors=[b for a, b, _ in docs if a not in queries])


# ---------------------------------------------------------------------------------------------
# exact search in bounded memory


def top_k(queries: torch.Tensor, docs: torch.Tensor, tie_rank: torch.Tensor, k: int,
          doc_chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of queries @ docsᵀ (rows already normalised): (q, k) scores and corpus indices, ordered by
    descending score, ties by ascending tie_rank.  Memory: one (q, doc_chunk) score block at a time."""
    k = min(k, docs.shape[0])
    best_scores = queries.new_empty((queries.shape[0], 0))
    best_index = torch.empty((queries.shape[0], 0), dtype=torch.int64, device=queries.device)
    tie_rank = tie_rank.to(queries.device)
    for start in range(0, docs.shape[0], doc_chunk):
        scores = queries @ docs[start : start + doc_chunk].T  # (q, chunk)
        kk = min(k, scores.shape[1])
        values, index = torch.topk(scores, kk, dim=1)
        # topk picks among equal scores arbitrarily: where the k-th score is tied, pick by the tie rule instead
        kth = values[:, -1:]
        tied_rows = ((scores >= kth).sum(dim=1) > kk).nonzero().flatten().tolist()
        for row in tied_rows:
            cand = (scores[row] >= kth[row]).nonzero().flatten()
            keep = _order(scores[row, cand][None], tie_rank[start + cand][None])[0][:kk]
            index[row], values[row] = cand[keep], scores[row, cand[keep]]
        best_scores = torch.cat([best_scores, values], dim=1)
        best_index = torch.cat([best_index, index + start], dim=1)
        keep = _order(best_scores, tie_rank[best_index])[:, :k]
        best_scores, best_index = best_scores.gather(1, keep), best_index.gather(1, keep)
    return best_scores, best_index


def _order(scores: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Per row, the permutation sorting by descending score, then ascending rank (two stable sorts)."""
    by_rank = torch.argsort(ranks, dim=1, stable=True)
    by_score = torch.argsort(-scores.gather(1, by_rank), dim=1, stable=True)
    return by_rank.gather(1, by_score)


# ---------------------------------------------------------------------------------------------
# metrics


def retrieval_metrics(ranked: list[list[int]], relevant: list[dict[int, float]]) -> dict[str, float]:
    """Mean over queries of nDCG@10, MRR@10, MAP@100, Recall@1/10/100 and Accuracy@1 (fractions in [0, 1]),
    from each query's ranked corpus indices (at least 100 or the whole corpus) and its relevant documents."""
    sums: dict[str, float] = defaultdict(float)
    for hits, rel in zip(ranked, relevant):
        is_rel = np.array([h in rel for h in hits[:MAX_K]], dtype=np.float64)
        gains = np.array([rel.get(h, 0.0) for h in hits[:MAX_K]], dtype=np.float64)
        discount = 1.0 / np.log2(np.arange(2, MAX_K + 2))
        for k in K_VALUES["ndcg"]:
            ideal = np.sort(np.fromiter(rel.values(), dtype=np.float64))[::-1][:k]
            sums[f"ndcg@{k}"] += float((gains[:k] * discount[: len(gains[:k])]).sum() / (ideal * discount[: len(ideal)]).sum())
        first = np.flatnonzero(is_rel)
        for k in K_VALUES["mrr"]:
            sums[f"mrr@{k}"] += 1.0 / (int(first[0]) + 1) if len(first) and first[0] < k else 0.0
        for k in K_VALUES["map"]:
            precision_at_hit = np.cumsum(is_rel[:k]) / np.arange(1, len(is_rel[:k]) + 1)
            sums[f"map@{k}"] += float((precision_at_hit * is_rel[:k]).sum() / min(k, len(rel)))
        for k in K_VALUES["recall"]:
            sums[f"recall@{k}"] += float(is_rel[:k].sum() / len(rel))
        for k in K_VALUES["accuracy"]:
            sums[f"accuracy@{k}"] += float(is_rel[:k].any())
    n = len(ranked)
    return {name: sums[name] / n for name in metric_names()}


def metric_names() -> list[str]:
    return [f"{m}@{k}" for m, ks in K_VALUES.items() for k in ks]
