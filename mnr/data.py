"""Training data: sources -> examples (anchor, positive[, negative]) -> token ids, cached on disk.

Sources are hub dataset names or local files (.tsv, .csv, .jsonl, .parquet, each optionally .gz).
Two schemas are understood:
  * NLI: premise, hypothesis, label.  Entailment (label 0 or "entailment") becomes a pair; every other
    label (neutral, contradiction, -1, "-") is dropped, except that with hard negatives the
    contradictions of the same premise become the negatives (rule in `nli_examples`).
  * pairs / triplets: anchor, positive[, negative].
Bad rows (empty or missing text, unknown label, anchor equal to positive) are skipped and counted in
`DataStats`, which the trainer logs.  TSV is read without quote processing: sentences may contain `"`.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

logger = logging.getLogger(__name__)

NLI_COLUMNS = ("premise", "hypothesis", "label")
PAIR_COLUMNS = ("anchor", "positive")
LOCAL_SUFFIXES = (".tsv", ".csv", ".jsonl", ".parquet")
MALFORMED = "__malformed__"  # marks a row with more fields than the header
ENTAILMENT, NEUTRAL, CONTRADICTION = "entailment", "neutral", "contradiction"
LABELS = {0: ENTAILMENT, 1: NEUTRAL, 2: CONTRADICTION, "0": ENTAILMENT, "1": NEUTRAL, "2": CONTRADICTION,
          ENTAILMENT: ENTAILMENT, NEUTRAL: NEUTRAL, CONTRADICTION: CONTRADICTION}
NO_GOLD_LABELS = {-1, "-1", "-", ""}  # SNLI/MNLI pairs without annotator agreement: dropped like other non-entailments


class DataError(ValueError):
    """Training or evaluation data cannot be used; the message names the source and what is wrong."""


@dataclass
class DataStats:
    """What happened to every row read: kept, or skipped for a counted reason."""

    rows: int = 0
    examples: int = 0
    skipped: Counter = field(default_factory=Counter)

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] += n

    def summary(self) -> str:
        parts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items()))
        return f"{self.rows} rows read, {self.examples} examples kept" + (f"; skipped: {parts}" if parts else "")


@dataclass
class Examples:
    """Training examples as parallel text columns; `negatives` is None for pairs."""

    anchors: list[str]
    positives: list[str]
    negatives: list[str] | None = None

    def __len__(self) -> int:
        return len(self.anchors)

    @property
    def n_roles(self) -> int:
        return 2 if self.negatives is None else 3

    def columns(self) -> list[list[str]]:
        return [self.anchors, self.positives] + ([self.negatives] if self.negatives is not None else [])


# ---------------------------------------------------------------------------------------------
# reading sources


def is_local(spec: str) -> bool:
    """A path that exists, or one named like a data file (then a missing file is an error, not a hub name)."""
    name = spec[:-3] if spec.endswith(".gz") else spec
    return os.path.exists(spec) or name.endswith(LOCAL_SUFFIXES)


def _open_text(path: str) -> io.TextIOBase:
    raw = gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8", errors="strict", newline="")


def read_local(path: str) -> tuple[list[str], Iterator[dict]]:
    """(columns, rows) of a local file. Raises DataError for missing, empty, non-UTF-8 or malformed files."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    base = path[:-3] if path.endswith(".gz") else path
    suffix = Path(base).suffix
    if suffix not in LOCAL_SUFFIXES:
        raise DataError(f"{path}: unknown format {suffix!r}; expected one of {', '.join(LOCAL_SUFFIXES)} (optionally .gz)")
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if table.num_rows == 0:
                raise DataError(f"{path}: file has no rows")
            return list(table.column_names), iter(table.to_pylist())
        if suffix == ".jsonl":
            rows = []
            with _open_text(path) as fh:
                for line_no, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as err:
                            raise DataError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
            if not rows:
                raise DataError(f"{path}: file is empty")
            columns = list(dict.fromkeys(k for row in rows[:100] for k in row))
            return columns, iter(rows)
        # tsv: no quote processing (sentences contain `"`); csv: standard quoting, strict about stray quotes
        with _open_text(path) as fh:
            reader = (csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE) if suffix == ".tsv"
                      else csv.reader(fh, strict=True))
            try:
                lines = list(reader)
            except csv.Error as err:
                raise DataError(f"{path}:{reader.line_num}: malformed CSV ({err}); quote fields that contain '\"'") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.object[err.start:err.start + 1]!r} at offset "
                        f"{err.start} of a chunk): re-encode the file as UTF-8") from None
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: cannot read ({err})") from None
    if not lines or not any(lines[0]):
        raise DataError(f"{path}: file is empty (no header line)")
    header = [h.strip() for h in lines[0]]
    width = len(header)

    def rows() -> Iterator[dict]:
        for values in lines[1:]:
            if not values:
                continue
            if len(values) > width:  # a stray delimiter: the fields cannot be trusted to line up
                yield {MALFORMED: True}
                continue
            # A short row leaves fields missing (None): counted as missing text later, never shifted.
            yield {h: (values[i] if i < len(values) else None) for i, h in enumerate(header)}

    return header, rows()


def _hub_spec(spec: str) -> tuple[str, str | None, str]:
    """'snli' -> ('snli', None, 'train'); 'glue/mnli' -> ('glue', 'mnli', 'train'); 'a/b:cfg@split'."""
    split = "train"
    if "@" in spec:
        spec, split = spec.rsplit("@", 1)
    config = None
    if ":" in spec:
        spec, config = spec.split(":", 1)
    if spec.startswith("glue/"):
        spec, config = "glue", spec.split("/", 1)[1]
    return spec, config, split


def read_hub(spec: str) -> tuple[list[str], Iterator[dict]]:
    name, config, split = _hub_spec(spec)
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split)
    except Exception as err:  # the hub raises many types; all mean the same to the user
        raise DataError(f"{spec!r}: neither a local file nor a loadable hub dataset ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); offline, pass local files") from None
    return list(ds.column_names), iter(ds)


def read_source(spec: str) -> tuple[list[str], Iterator[dict]]:
    spec = spec.strip()
    return read_local(spec) if is_local(spec) else read_hub(spec)


# ---------------------------------------------------------------------------------------------
# rows -> examples


def _text(value) -> str | None:
    if value is None or not isinstance(value, str):
        return None
    value = value.strip()
    return value or None


def detect_schema(source: str, columns: Iterable[str]) -> str:
    cols = set(columns)
    if set(NLI_COLUMNS) <= cols:
        return "nli"
    if set(PAIR_COLUMNS) <= cols:
        return "triplet" if "negative" in cols else "pair"
    raise DataError(f"{source}: columns found: {', '.join(map(str, columns)) or '(none)'}; expected "
                    f"{', '.join(NLI_COLUMNS)} (NLI) or {', '.join(PAIR_COLUMNS)}[, negative] (pairs/triplets)")


def nli_examples(rows: Iterable[dict], hard_negatives: bool, stats: DataStats) -> Examples:
    """Entailment pairs; with hard_negatives, (premise, entailment, contradiction) triplets.

    Triplet rule: hypotheses are grouped by premise; the i-th entailment of a premise takes the
    (i mod k)-th of its k contradictions.  An entailment whose premise has no contradiction is
    dropped (counted as "no contradiction for premise"), so every triplet has a real hard negative.
    """
    entail: dict[str, list[str]] = defaultdict(list)
    contra: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        stats.rows += 1
        if row.get(MALFORMED):
            stats.skip("malformed row (more fields than the header)")
            continue
        raw_label = row.get("label")
        label = LABELS.get(raw_label.strip().lower() if isinstance(raw_label, str) else raw_label)
        if label is None:
            stats.skip("no gold label (-1/-)" if raw_label in NO_GOLD_LABELS or (
                isinstance(raw_label, str) and raw_label.strip() in NO_GOLD_LABELS) else "unknown label")
            continue
        premise, hypothesis = _text(row.get("premise")), _text(row.get("hypothesis"))
        if premise is None or hypothesis is None:
            stats.skip("empty or missing text")
            continue
        if label == ENTAILMENT:
            entail[premise].append(hypothesis)
        elif label == CONTRADICTION:
            contra[premise].append(hypothesis)
        else:
            stats.skip("neutral (not used)")
    if hard_negatives:
        stats.skip("contradiction used as negative or unused", sum(len(v) for v in contra.values()))
    else:
        stats.skip("contradiction (not used for pairs)", sum(len(v) for v in contra.values()))
    anchors, positives, negatives = [], [], []
    for premise, hyps in entail.items():
        negs = contra.get(premise, [])
        if hard_negatives and not negs:
            stats.skip("no contradiction for premise", len(hyps))
            continue
        for i, hyp in enumerate(hyps):
            anchors.append(premise)
            positives.append(hyp)
            if hard_negatives:
                negatives.append(negs[i % len(negs)])
    return Examples(anchors, positives, negatives if hard_negatives else None)


def pair_examples(source: str, rows: Iterable[dict], hard_negatives: bool, has_negative: bool, stats: DataStats) -> Examples:
    if hard_negatives and not has_negative:
        raise DataError(f"{source}: --hard-negatives needs a 'negative' column (or NLI premise/hypothesis/label "
                        f"rows); pass --no-hard-negatives to train on its anchor/positive pairs")
    anchors, positives, negatives = [], [], []
    for row in rows:
        stats.rows += 1
        if row.get(MALFORMED):
            stats.skip("malformed row (more fields than the header)")
            continue
        texts = [_text(row.get("anchor")), _text(row.get("positive"))]
        if hard_negatives:
            texts.append(_text(row.get("negative")))
        if any(t is None for t in texts):
            stats.skip("empty or missing text")
            continue
        anchors.append(texts[0])
        positives.append(texts[1])
        if hard_negatives:
            negatives.append(texts[2])
    return Examples(anchors, positives, negatives if hard_negatives else None)


def load_examples(specs: str | list[str], hard_negatives: bool) -> tuple[Examples, DataStats]:
    """Read every comma-separated source and build one set of examples, with counted skips."""
    if isinstance(specs, str):
        specs = [s for s in specs.split(",") if s.strip()]
    stats = DataStats()
    merged = Examples([], [], [] if hard_negatives else None)
    for spec in specs:
        columns, rows = read_source(spec)
        schema = detect_schema(spec, columns)
        if schema == "nli":
            ex = nli_examples(rows, hard_negatives, stats)
        else:
            ex = pair_examples(spec, rows, hard_negatives, schema == "triplet", stats)
        for into, col in zip(merged.columns(), ex.columns()):
            into.extend(col)
    keep = [i for i, texts in enumerate(zip(*merged.columns())) if len(set(texts)) == len(texts)]
    if len(keep) < len(merged):
        stats.skip("same text twice in one example", len(merged) - len(keep))
        merged = Examples(*[[col[i] for i in keep] for col in merged.columns()])
    stats.examples = len(merged)
    if stats.examples == 0:
        raise DataError(f"{', '.join(specs)}: no usable examples ({stats.summary()})")
    return merged, stats


# ---------------------------------------------------------------------------------------------
# examples -> token ids (tokenised once per unique text, cached as Arrow on disk)


@dataclass
class TokenizedData:
    """token_ids[t] are the ids of unique text t; text_ids[i, r] is the text of example i in role r."""

    token_ids: list[list[int]]
    text_ids: np.ndarray  # (n_examples, n_roles) int64

    def __len__(self) -> int:
        return self.text_ids.shape[0]

    @property
    def n_roles(self) -> int:
        return self.text_ids.shape[1]


def default_cache_dir() -> str:
    return os.environ.get("MNR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mnr")


def tokenize_examples(examples: Examples, tokenizer, max_seq_length: int, cache_dir: str = "") -> TokenizedData:
    """Tokenise each unique text once with the fast tokenizer (batched `datasets.map`), truncating at
    max_seq_length, without padding; the result is cached under a fingerprint of texts + tokenizer + length."""
    import datasets

    text_index: dict[str, int] = {}
    columns = examples.columns()
    text_ids = np.empty((len(examples), len(columns)), dtype=np.int64)
    for r, col in enumerate(columns):
        for i, text in enumerate(col):
            text_ids[i, r] = text_index.setdefault(text, len(text_index))
    texts = list(text_index)
    digest = hashlib.sha256()
    for part in (type(tokenizer).__name__, str(len(tokenizer)), str(getattr(tokenizer, "name_or_path", "")),
                 json.dumps(getattr(tokenizer, "init_kwargs", {}).get("do_lower_case")), str(max_seq_length)):
        digest.update(part.encode() + b"\0")
    vocab_hash = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()
    digest.update(vocab_hash.encode())
    for text in texts:
        digest.update(text.encode() + b"\0")
    cache_dir = cache_dir or default_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    cache_file = os.path.join(cache_dir, f"tokens-{digest.hexdigest()[:24]}.arrow")

    def encode(batch):
        return {"input_ids": tokenizer(batch["text"], truncation=True, max_length=max_seq_length,
                                       add_special_tokens=True)["input_ids"]}

    ds = datasets.Dataset.from_dict({"text": texts}).map(
        encode, batched=True, batch_size=2000, remove_columns=["text"], cache_file_name=cache_file,
        load_from_cache_file=True, desc="Tokenising")
    return TokenizedData(token_ids=ds.data.column("input_ids").to_pylist(), text_ids=text_ids)
