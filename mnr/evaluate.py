"""STS evaluation: Spearman correlation (x100) of cosine similarity with gold scores.

    python -m mnr.evaluate CHECKPOINT --data FILE      # FILE: sentence1, sentence2, score (tsv/csv/jsonl/parquet)
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mnr.data import DataError, read_source

logger = logging.getLogger(__name__)


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
    score_col = "score" if "score" in columns else "label" if "label" in columns else None
    if not {"sentence1", "sentence2"} <= set(columns) or score_col is None:
        raise DataError(f"{spec}: columns found: {', '.join(map(str, columns))}; expected sentence1, sentence2, score")
    s1, s2, scores, skipped = [], [], [], 0
    for row in rows:
        a, b = row.get("sentence1"), row.get("sentence2")
        try:
            score = float(row.get(score_col))
        except (TypeError, ValueError):
            score = float("nan")
        if not (isinstance(a, str) and a.strip() and isinstance(b, str) and b.strip()) or not np.isfinite(score):
            skipped += 1
            continue
        s1.append(a.strip())
        s2.append(b.strip())
        scores.append(score)
    if len(scores) < 2:
        raise DataError(f"{spec}: fewer than 2 usable STS pairs ({skipped} bad rows skipped)")
    if skipped:
        logger.warning("%s: skipped %d rows with empty text or a non-numeric score", spec, skipped)
    return STSData(s1, s2, np.asarray(scores, dtype=np.float64), skipped)


@torch.no_grad()
def encode(encoder, tokenizer, texts: list[str], max_seq_length: int = 128, batch_size: int = 64,
           device: torch.device | str | None = None) -> torch.Tensor:
    """(n, d) float32 embeddings (not normalised) in input order; batches sorted by length for speed."""
    device = device or next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = [None] * len(texts)
    for start in range(0, len(texts), batch_size):
        idx = order[start : start + batch_size]
        batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_seq_length,
                          return_tensors="pt")
        emb = encoder(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu()
        for j, i in enumerate(idx):
            out[i] = emb[j]
    encoder.train(was_training)
    return torch.stack(out)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic)


def sts_spearman(encoder, tokenizer, data: STSData, max_seq_length: int = 128, batch_size: int = 64) -> float:
    """Spearman x 100 of cos(emb(sentence1), emb(sentence2)) against the gold scores."""
    texts = list(dict.fromkeys(data.sentences1 + data.sentences2))
    emb = F.normalize(encode(encoder, tokenizer, texts, max_seq_length, batch_size), dim=-1)
    pos = {t: i for i, t in enumerate(texts)}
    a = emb[[pos[t] for t in data.sentences1]]
    b = emb[[pos[t] for t in data.sentences2]]
    cosine = (a * b).sum(dim=-1).numpy()
    return 100.0 * spearman(cosine, data.scores)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mnr.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="model directory (or hub id) to evaluate")
    parser.add_argument("--data", required=True, help="STS pairs: local file (sentence1, sentence2, score) or glue/stsb")
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    from mnr.model import ModelError, load_encoder

    try:
        data = load_sts(args.data)
        encoder, tokenizer = load_encoder(args.checkpoint, args.trust_remote_code)
    except (DataError, ModelError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    score = sts_spearman(encoder, tokenizer, data, args.max_seq_length, args.batch_size)
    print(f"STS Spearman x100 of {args.checkpoint} on {args.data} ({len(data.scores)} pairs): {score:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
