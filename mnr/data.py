"""Training data: sources -> examples (anchor, positive[, negative]) -> token ids, cached on disk.

Sources are hub dataset names or local files (.tsv, .csv, .jsonl, .parquet, each optionally .gz).
Two schemas are understood:
  * NLI: premise, hypothesis, label.  Entailment (label 0 or "entailment") becomes a pair; every other
    label (neutral, contradiction, -1, "-") is dropped, except that with hard negatives the
    contradictions of the same premise become the negatives (rule in `nli_examples`).
  * pairs / triplets: anchor, positive[, negative].
Bad rows (empty or missing text, unknown label, anchor equal to positive) are skipped and counted in
`DataStats`, which the trainer logs.  TSV is read without quote processing: sentences may contain `"`.
Every source is read as a stream (`iter_examples` yields chunks of text ids; `mnr.store` turns them into the
memory-mapped token store); `load_examples` collects strings for small data (tests, benchmarks).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import os
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

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
        if n:
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


def _readable_files(directory: str) -> list[str]:
    names = sorted(os.listdir(directory))
    return [n for n in names if (n[:-3] if n.endswith(".gz") else n).endswith(LOCAL_SUFFIXES)
            and os.path.isfile(os.path.join(directory, n))]


def read_local(path: str) -> tuple[list[str], Iterator[dict]]:
    """(columns, rows) of a local file, rows read as a stream (never the whole file in Python lists).

    Raises DataError for missing, empty, non-UTF-8 or malformed files; an error in the middle of a file
    is raised by the row iterator."""
    if os.path.isdir(path):
        found = _readable_files(path)
        raise DataError(f"{path}: is a directory, not a data file; " + (
            f"data files in it that mnr can read: {', '.join(found)} (pass them comma-separated)" if found else
            f"it holds no file mnr can read ({', '.join(LOCAL_SUFFIXES)}, optionally .gz)"))
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    base = path[:-3] if path.endswith(".gz") else path
    suffix = Path(base).suffix
    if suffix not in LOCAL_SUFFIXES:
        raise DataError(f"{path}: unknown format {suffix!r}; expected one of {', '.join(LOCAL_SUFFIXES)} (optionally .gz)")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise DataError(f"{path}: cannot read as Parquet ({err})") from None
        if parquet.metadata.num_rows == 0:
            raise DataError(f"{path}: file has no rows")
        rows = (row for batch in parquet.iter_batches(batch_size=10_000) for row in batch.to_pylist())
        return list(parquet.schema_arrow.names), rows
    fh = _open_text(path)
    with _read_errors(path, fh):
        if suffix == ".jsonl":
            head, line_no = [], 0
            for line in fh:  # the first 100 rows name the columns
                line_no += 1
                if line.strip():
                    head.append(_json_row(path, line_no, line))
                    if len(head) == 100:
                        break
            if not head:
                raise DataError(f"{path}: file is empty")
            columns = list(dict.fromkeys(k for row in head for k in row))
            return columns, _guarded(path, fh, _jsonl_rows(path, fh, head, line_no))
        # tsv: no quote processing (sentences contain `"`); csv: standard quoting, strict about stray quotes
        reader = (csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE) if suffix == ".tsv"
                  else csv.reader(fh, strict=True))
        first = next(reader, None)
        if not first or not any(first):
            raise DataError(f"{path}: file is empty (no header line)")
    header = [h.strip() for h in first]
    return header, _guarded(path, fh, _csv_rows(header, reader), reader)


def _json_row(path: str, line_no: int, line: str) -> dict:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None


def _jsonl_rows(path: str, fh, head: list[dict], line_no: int) -> Iterator[dict]:
    yield from head
    for line in fh:
        line_no += 1
        if line.strip():
            yield _json_row(path, line_no, line)


def _csv_rows(header: list[str], reader) -> Iterator[dict]:
    width = len(header)
    for values in reader:
        if not values:
            continue
        if len(values) > width:  # a stray delimiter: the fields cannot be trusted to line up
            yield {MALFORMED: True}
            continue
        # A short row leaves fields missing (None): counted as missing text later, never shifted.
        yield {h: (values[i] if i < len(values) else None) for i, h in enumerate(header)}


class _read_errors:
    """Turns decoding, CSV and I/O errors of a file into a DataError naming the file (closing it)."""

    def __init__(self, path: str, fh, reader=None):
        self.path, self.fh, self.reader = path, fh, reader

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if err is None:
            return False
        self.fh.close()
        if isinstance(err, UnicodeDecodeError):
            raise DataError(f"{self.path}: not UTF-8 text (byte {err.object[err.start:err.start + 1]!r} at offset "
                            f"{err.start} of a chunk): re-encode the file as UTF-8") from None
        if isinstance(err, csv.Error):
            line = f":{self.reader.line_num}" if self.reader is not None else ""
            raise DataError(f"{self.path}{line}: malformed CSV ({err}); quote fields that contain '\"'") from None
        if isinstance(err, (OSError, EOFError)):
            raise DataError(f"{self.path}: cannot read ({err})") from None
        return False


def _guarded(path: str, fh, rows: Iterator[dict], reader=None) -> Iterator[dict]:
    with _read_errors(path, fh, reader):
        yield from rows
    fh.close()


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


def load_hub(spec: str):
    """The hub dataset split named by spec (Arrow-backed, memory-mapped by `datasets`)."""
    name, config, split = _hub_spec(spec)
    try:
        import datasets

        return datasets.load_dataset(name, config, split=split)
    except Exception as err:  # the hub raises many types; all mean the same to the user
        raise DataError(f"{spec!r}: neither a local file nor a loadable hub dataset ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}); offline, pass local files") from None


def read_hub(spec: str) -> tuple[list[str], Iterator[dict]]:
    """(columns, rows) of a hub split, read from its Arrow table batch by batch (never the whole split as rows)."""
    ds = load_hub(spec)
    columns = list(ds.column_names)

    def rows() -> Iterator[dict]:
        for batch in ds.iter(batch_size=10_000):
            yield from (dict(zip(columns, values)) for values in zip(*(batch[c] for c in columns)))

    return columns, rows()


def read_source(spec: str) -> tuple[list[str], Iterator[dict]]:
    spec = spec.strip()
    return read_local(spec) if is_local(spec) else read_hub(spec)


def split_specs(specs: str | list[str]) -> list[str]:
    if isinstance(specs, str):
        specs = specs.split(",")
    return [s.strip() for s in specs if s.strip()]


# ---------------------------------------------------------------------------------------------
# rows -> examples (streamed as chunks of text ids; `intern(text, role)` maps a text in a role to its id)

QUERY, DOCUMENT = 0, 1  # the role a text is interned in: anchors are queries, positives and negatives documents


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


CHUNK_ROWS = 50_000


def _ids(values: array) -> np.ndarray:
    return np.frombuffer(values, dtype=np.int64) if len(values) else np.empty(0, dtype=np.int64)


def _nli_row(row: dict, stats: DataStats) -> tuple[str, str, str] | None:
    """(label, premise, hypothesis) of one NLI row, or None for a row that is skipped (and counted)."""
    stats.rows += 1
    if row.get(MALFORMED):
        stats.skip("malformed row (more fields than the header)")
        return None
    raw_label = row.get("label")
    label = LABELS.get(raw_label.strip().lower() if isinstance(raw_label, str) else raw_label)
    if label is None:
        stats.skip("no gold label (-1/-)" if raw_label in NO_GOLD_LABELS or (
            isinstance(raw_label, str) and raw_label.strip() in NO_GOLD_LABELS) else "unknown label")
        return None
    premise, hypothesis = _text(row.get("premise")), _text(row.get("hypothesis"))
    if premise is None or hypothesis is None:
        stats.skip("empty or missing text")
        return None
    return label, premise, hypothesis


def nli_examples(rows: Iterable[dict], hard_negatives: bool, stats: DataStats, intern: Callable[[str, int], int]
                 ) -> Iterator[np.ndarray]:
    """Entailment pairs; with hard_negatives, (premise, entailment, contradiction) triplets, as text ids.

    Triplet rule: hypotheses are grouped by premise; the i-th entailment of a premise takes the
    (i mod k)-th of its k contradictions.  An entailment whose premise has no contradiction is
    dropped (counted as "no contradiction for premise"), so every triplet has a real hard negative.
    Premises come in the order of their first entailment, each premise's entailments in row order.
    The grouping keeps text ids in flat integer arrays, never the strings.
    """
    ent_p, ent_h, con_p, con_h = array("q"), array("q"), array("q"), array("q")
    n_contra = 0
    for row in rows:
        parsed = _nli_row(row, stats)
        if parsed is None:
            continue
        label, premise, hypothesis = parsed
        if label == ENTAILMENT:
            ent_p.append(intern(premise, QUERY))
            ent_h.append(intern(hypothesis, DOCUMENT))
        elif label == CONTRADICTION:
            n_contra += 1
            if hard_negatives:
                con_p.append(intern(premise, QUERY))
                con_h.append(intern(hypothesis, DOCUMENT))
        else:
            stats.skip("neutral (not used)")
    stats.skip("contradiction used as negative or unused" if hard_negatives else "contradiction (not used for pairs)",
               n_contra)
    ent_p, ent_h, con_p, con_h = _ids(ent_p), _ids(ent_h), _ids(con_p), _ids(con_h)
    if len(ent_p) == 0:
        return
    # order: premises by their first entailment, then row order within a premise
    premises, first_row, group = np.unique(ent_p, return_index=True, return_inverse=True)
    rank = np.empty(len(premises), dtype=np.int64)
    rank[np.argsort(first_row, kind="stable")] = np.arange(len(premises))
    order = np.lexsort((np.arange(len(ent_p)), rank[group]))
    ent_p, ent_h = ent_p[order], ent_h[order]
    if not hard_negatives:
        yield np.stack([ent_p, ent_h], axis=1)
        return
    by_premise = np.argsort(con_p, kind="stable")  # each premise's contradictions in row order
    con_p, con_h = con_p[by_premise], con_h[by_premise]
    lo, hi = np.searchsorted(con_p, ent_p, "left"), np.searchsorted(con_p, ent_p, "right")
    k = hi - lo
    starts = np.r_[0, np.flatnonzero(ent_p[1:] != ent_p[:-1]) + 1]  # ent_p is grouped by premise
    i = np.arange(len(ent_p)) - np.repeat(starts, np.diff(np.r_[starts, len(ent_p)]))  # i-th entailment of its premise
    has = k > 0
    stats.skip("no contradiction for premise", int((~has).sum()))
    neg = con_h[lo[has] + i[has] % k[has]]
    yield np.stack([ent_p[has], ent_h[has], neg], axis=1)


def pair_examples(source: str, rows: Iterable[dict], hard_negatives: bool, has_negative: bool, stats: DataStats,
                  intern: Callable[[str, int], int]) -> Iterator[np.ndarray]:
    if hard_negatives and not has_negative:
        raise DataError(f"{source}: --hard-negatives needs a 'negative' column (or NLI premise/hypothesis/label "
                        f"rows); pass --no-hard-negatives to train on its anchor/positive pairs")
    roles = ("anchor", "positive", "negative") if hard_negatives else ("anchor", "positive")
    chunk = array("q")
    for row in rows:
        stats.rows += 1
        if row.get(MALFORMED):
            stats.skip("malformed row (more fields than the header)")
            continue
        texts = [_text(row.get(role)) for role in roles]
        if None in texts:
            stats.skip("empty or missing text")
            continue
        chunk.extend(intern(text, QUERY if i == 0 else DOCUMENT) for i, text in enumerate(texts))
        if len(chunk) >= CHUNK_ROWS * len(roles):
            yield _ids(chunk).reshape(-1, len(roles)).copy()
            chunk = array("q")
    if chunk:
        yield _ids(chunk).reshape(-1, len(roles)).copy()


def iter_examples(specs: str | list[str], hard_negatives: bool, stats: DataStats, intern: Callable[[str, int], int]
                  ) -> Iterator[np.ndarray]:
    """Every source read as a stream: chunks of (rows, roles) text ids, with counted skips in `stats`.

    An example with the same text twice (anchor equal to positive, ...) is skipped and counted."""
    for spec in split_specs(specs):
        columns, rows = read_source(spec)
        schema = detect_schema(spec, columns)
        chunks = (nli_examples(rows, hard_negatives, stats, intern) if schema == "nli"
                  else pair_examples(spec, rows, hard_negatives, schema == "triplet", stats, intern))
        for ids in chunks:
            ok = ids[:, 0] != ids[:, 1]
            if ids.shape[1] == 3:
                ok &= (ids[:, 2] != ids[:, 0]) & (ids[:, 2] != ids[:, 1])
            if not ok.all():
                stats.skip("same text twice in one example", int((~ok).sum()))
                ids = ids[ok]
            stats.examples += len(ids)
            if len(ids):
                yield ids


def no_examples_error(specs: str | list[str], stats: DataStats) -> DataError:
    return DataError(f"{', '.join(split_specs(specs))}: no usable examples ({stats.summary()})")


def load_examples(specs: str | list[str], hard_negatives: bool) -> tuple[Examples, DataStats]:
    """All examples as Python strings (small data, tests and benchmarks; training reads `mnr.store`)."""
    stats = DataStats()
    index: dict[str, int] = {}
    chunks = list(iter_examples(specs, hard_negatives, stats, lambda t, role: index.setdefault(t, len(index))))
    if stats.examples == 0:
        raise no_examples_error(specs, stats)
    texts = list(index)
    ids = np.concatenate(chunks)
    return Examples(*[[texts[t] for t in col] for col in ids.T.tolist()]), stats


def default_cache_dir() -> str:
    return os.environ.get("MNR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mnr")
