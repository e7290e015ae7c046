"""Training data: sources -> examples (anchor, positive[, negative]) -> token ids, cached on disk.

Sources are hub dataset names or local files (.tsv, .csv, .jsonl, .parquet, each optionally .gz).
Two schemas are understood:
  * NLI: premise, hypothesis, label.  Entailment (label 0 or "entailment") becomes a pair; every other
    label (neutral, contradiction, -1, "-") is dropped, except that with hard negatives the
    contradictions of the same premise become the negatives (rule in `nli_examples`).
  * pairs / triplets: anchor, positive[, negative | negative_1 ... negative_k | negatives (a list, in
    JSON/JSONL/Parquet)].
An example is a row of text ids: anchor, positive, then its negatives, padded with -1 (NO_TEXT) to the
widest example of the store; `iter_examples` also says which source (0, 1, ...) each chunk came from.
Hard negatives: True reads them from every source (a source without any is an error), False never,
None ("auto") from every source that has them.
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
import numbers
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
MALFORMED = "__malformed__"  # key of a row that cannot be read as fields; its value is the skip reason
ENTAILMENT, NEUTRAL, CONTRADICTION = "entailment", "neutral", "contradiction"
LABELS = {0: ENTAILMENT, 1: NEUTRAL, 2: CONTRADICTION, "0": ENTAILMENT, "1": NEUTRAL, "2": CONTRADICTION,
          ENTAILMENT: ENTAILMENT, NEUTRAL: NEUTRAL, CONTRADICTION: CONTRADICTION}
NO_GOLD_LABELS = {-1, "-1", "-", ""}  # SNLI/MNLI pairs without annotator agreement: dropped like other non-entailments
NO_TEXT = -1  # an empty negative slot of an example with fewer negatives than the widest one
MAX_NLI_NEGATIVES = 16  # contradictions kept per premise (the rest are counted, not used)


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
        rows, examples = ("row" if self.rows == 1 else "rows"), ("example" if self.examples == 1 else "examples")
        return f"{self.rows} {rows} read, {self.examples} {examples} kept" + (f"; skipped: {parts}" if parts else "")


@dataclass
class Examples:
    """Training examples as parallel text columns; `all_negatives` (every negative of each example) is None for
    pairs."""

    anchors: list[str]
    positives: list[str]
    all_negatives: list[list[str]] | None = None

    def __len__(self) -> int:
        return len(self.anchors)

    def columns(self) -> list[list[str]]:
        """anchor, positive and, with negatives, each example's first negative ('' for none)."""
        if self.all_negatives is None:
            return [self.anchors, self.positives]
        return [self.anchors, self.positives, [n[0] if n else "" for n in self.all_negatives]]


# ---------------------------------------------------------------------------------------------
# reading sources


def is_local(spec: str) -> bool:
    """A path that exists, or one named like a data file (then a missing file is an error, not a hub name)."""
    name = spec[:-3] if spec.endswith(".gz") else spec
    return os.path.exists(spec) or name.endswith(LOCAL_SUFFIXES)


def _open_text(path: str) -> io.TextIOBase:
    """UTF-8 text, a leading byte-order mark dropped (utf-8-sig: spreadsheet exports start with one)."""
    return io.TextIOWrapper(_open_bytes(path), encoding="utf-8-sig", errors="strict", newline="")


def _open_bytes(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _readable_files(directory: str) -> list[str]:
    names = sorted(os.listdir(directory))
    return [n for n in names if (n[:-3] if n.endswith(".gz") else n).endswith(LOCAL_SUFFIXES)
            and os.path.isfile(os.path.join(directory, n))]


def read_local(path: str) -> tuple[list[str], Iterator[dict]]:
    """(columns, rows) of a local file, rows read as a stream (never the whole file in Python lists).

    Raises DataError for missing, empty, non-UTF-8 or malformed files and for a column named twice; an error in
    the middle of a file is raised by the row iterator.  A row that cannot be read as fields (a JSONL line that
    is not an object, a TSV text beyond the csv field size limit) comes as {MALFORMED: skip reason}."""
    suffix = check_file(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise DataError(f"{path}: cannot read as Parquet ({err})") from None
        if parquet.metadata.num_rows == 0:
            raise DataError(f"{path}: file has no rows")
        columns = unique_columns(path, list(parquet.schema_arrow.names))
        rows = (row for batch in parquet.iter_batches(batch_size=10_000) for row in batch.to_pylist())
        return columns, rows
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
            objects = [row for row in head if MALFORMED not in row]
            if not objects:
                lines = "its only line is not" if len(head) == 1 else f"none of its first {len(head)} lines is"
                raise DataError(f"{path}: {lines} a JSON object ({head[0][MALFORMED]}); a .jsonl file holds one "
                                f"object per line, e.g. {{\"anchor\": \"...\", \"positive\": \"...\"}}")
            columns = list(dict.fromkeys(k for row in objects for k in row))
            return columns, _guarded(path, fh, _jsonl_rows(path, fh, head, line_no))
        # tsv: no quote processing (sentences contain `"`); csv: standard quoting, strict about stray quotes
        reader = (csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE) if suffix == ".tsv"
                  else csv.reader(fh, strict=True))
        first = next(reader, None)
        if not first or not any(first):
            raise DataError(f"{path}: file is empty (no header line)")
        header = unique_columns(path, [h.strip() for h in first])
    return header, _guarded(path, fh, _csv_rows(header, reader, suffix == ".tsv"), reader)


def check_file(path: str) -> str:
    """The format suffix of a local data file (.tsv, .csv, .jsonl, .parquet); DataError for a missing file,
    a directory or an unknown format."""
    if os.path.isdir(path):
        found = _readable_files(path)
        raise DataError(f"{path}: is a directory, not a data file; " + (
            f"data files in it that mnr can read: {', '.join(found)} (pass them comma-separated)" if found else
            f"it holds no file mnr can read ({', '.join(LOCAL_SUFFIXES)}, optionally .gz)"))
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    suffix = Path(path[:-3] if path.endswith(".gz") else path).suffix
    if suffix not in LOCAL_SUFFIXES:
        raise DataError(f"{path}: unknown format {suffix!r}; expected one of {', '.join(LOCAL_SUFFIXES)} (optionally .gz)")
    return suffix


def check_sources(specs: Iterable[str], folders: bool = False) -> None:
    """DataError for the first local source that is missing, of an unknown format or a directory (with
    `folders`, as for evaluation sets, a directory passes: a BEIR folder); hub names pass.  Called before any
    work, so that nothing is built or announced for a run that cannot read its data."""
    for spec in (s.strip() for s in specs):
        if spec and is_local(spec) and not (folders and os.path.isdir(spec)):
            check_file(spec)


def unique_columns(path: str, columns: list[str]) -> list[str]:
    """`columns`, or DataError naming the first one that appears twice (a reader would keep only one of them).
    Unnamed columns (e.g. from trailing delimiters) are never read, so they may repeat."""
    seen = Counter(c for c in columns if c != "")
    twice = [c for c in seen if seen[c] > 1]
    if twice:
        raise DataError(f"{path}: column {twice[0]!r} appears {seen[twice[0]]} times in the header; which one to "
                        f"read is ambiguous: give every column its own name")
    return columns


class _DuplicateKey(ValueError):
    pass


def _object_pairs(pairs: list[tuple[str, object]]) -> dict:
    """json object hook: json.loads alone keeps the last of two equal keys, silently."""
    out = dict(pairs)
    if len(out) < len(pairs):
        counts = Counter(k for k, _ in pairs)
        raise _DuplicateKey(next(k for k, _ in pairs if counts[k] > 1))
    return out


JSON_KINDS = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "true/false",
              type(None): "null"}


def _json_row(path: str, line_no: int, line: str) -> dict:
    """One JSONL line as a row: an object, or {MALFORMED: reason} for any other JSON value."""
    try:
        row = json.loads(line, object_pairs_hook=_object_pairs)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{line_no}: not valid JSON ({err.msg})") from None
    except _DuplicateKey as err:
        raise DataError(f"{path}:{line_no}: key {err.args[0]!r} appears twice in one object; which one to read "
                        f"is ambiguous") from None
    if not isinstance(row, dict):
        return {MALFORMED: f"line not a JSON object ({JSON_KINDS.get(type(row), type(row).__name__)})"}
    return row


def _jsonl_rows(path: str, fh, head: list[dict], line_no: int) -> Iterator[dict]:
    yield from head
    for line in fh:
        line_no += 1
        if line.strip():
            yield _json_row(path, line_no, line)


def _csv_rows(header: list[str], reader, tsv: bool) -> Iterator[dict]:
    """Rows as dicts.  TSV: a text beyond the csv field size limit skips its line (one line is one row without
    quoting; the reader goes on at the next one); in a CSV it may be an unclosed quote, so it is an error."""
    width = len(header)
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            if not (tsv and _beyond_field_limit(err)):
                raise
            yield {MALFORMED: f"text longer than {csv.field_size_limit()} characters (the csv field size limit)"}
            continue
        if not values:
            continue
        if len(values) > width:  # a stray delimiter: the fields cannot be trusted to line up
            yield {MALFORMED: "malformed row (more fields than the header)"}
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
            utf16 = " (it starts with a UTF-16 byte-order mark)" if _starts_utf16(self.path) else ""
            raise DataError(f"{self.path}: not UTF-8 text{utf16} (byte {err.object[err.start:err.start + 1]!r} at "
                            f"offset {err.start} of a chunk): re-encode the file as UTF-8") from None
        if isinstance(err, csv.Error):
            line = f":{self.reader.line_num}" if self.reader is not None else ""
            if _beyond_field_limit(err):  # only a CSV gets here (a TSV skips the row)
                raise DataError(f"{self.path}{line}: a field longer than {csv.field_size_limit()} characters (the csv "
                                f"field size limit): a '\"' that opens a quoted field and never closes it, or one "
                                f"text that long (write such data as .jsonl)") from None
            raise DataError(f"{self.path}{line}: malformed CSV ({err}); quote fields that contain '\"'") from None
        if isinstance(err, (OSError, EOFError)):
            raise DataError(f"{self.path}: cannot read ({err})") from None
        return False


def _starts_utf16(path: str) -> bool:
    """Whether the file begins with a UTF-16 byte-order mark (what spreadsheets save as "Unicode text")."""
    try:
        with _open_bytes(path) as fh:
            return fh.read(2) in (b"\xff\xfe", b"\xfe\xff")
    except (OSError, EOFError):
        return False


def _beyond_field_limit(err: csv.Error) -> bool:
    return "field larger than field limit" in str(err)


def _guarded(path: str, fh, rows: Iterator[dict], reader=None) -> Iterator[dict]:
    with _read_errors(path, fh, reader):
        yield from rows
    fh.close()


def hub_spec(spec: str) -> tuple[str, str | None, str]:
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
    name, config, split = hub_spec(spec)
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
    """The sources of a comma-separated spec, without their `*weight` suffixes."""
    return [spec for spec, _ in weighted_specs(specs)]


def weighted_specs(specs: str | list[str]) -> list[tuple[str, float | None]]:
    """'a.tsv*2,b.tsv' -> [('a.tsv', 2.0), ('b.tsv', None)]; a bad weight is a DataError naming it."""
    if isinstance(specs, str):
        specs = specs.split(",")
    out = []
    for spec in (s.strip() for s in specs if s.strip()):
        weight = None
        if "*" in spec:
            spec, text = (part.strip() for part in spec.rsplit("*", 1))
            try:
                weight = float(text)
            except ValueError:
                weight = float("nan")
            if not 0 < weight < float("inf"):
                raise DataError(f"{spec}*{text}: the weight {text!r} after '*' is not a positive number")
        out.append((spec, weight))
    return out


# ---------------------------------------------------------------------------------------------
# rows -> examples (streamed as chunks of text ids; `intern(text, role)` maps a text in a role to its id)

QUERY, DOCUMENT = 0, 1  # the role a text is interned in: anchors are queries, positives and negatives documents


def cell_text(value) -> str | None:
    """The stripped text of a cell; None for a missing, empty or non-text cell, and for text that is not valid
    Unicode (a lone surrogate, e.g. from a JSON "\\ud800" escape: no tokenizer or hash can take it)."""
    if value is None or not isinstance(value, str):
        return None
    value = value.strip()
    if not value.isascii() and not _is_unicode(value):
        return None
    return value or None


def _is_unicode(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _unusable_text(values) -> str:
    """The skip reason of a row with an unusable text (`values`: its raw cells, usable ones among them)."""
    if any(isinstance(v, str) and not _is_unicode(v) for v in values):
        return "text not valid Unicode (a lone surrogate)"
    if any(v is not None and not isinstance(v, str) for v in values):
        return "field not text (a number, list or object)"
    return "empty or missing text"


def nli_label(raw) -> str | None:
    """ENTAILMENT, NEUTRAL or CONTRADICTION for a label cell (0/1/2, their names, any case), None for any other
    value: a no-gold mark, an unknown name, a list or an object."""
    if isinstance(raw, str):
        return LABELS.get(raw.strip().lower())
    return LABELS.get(raw) if _is_number(raw) else None


def _no_gold(raw) -> bool:
    return raw.strip() in NO_GOLD_LABELS if isinstance(raw, str) else _is_number(raw) and raw in NO_GOLD_LABELS


def _is_number(value) -> bool:
    """An int or float (numpy's too), not a bool (true is no label)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def detect_schema(source: str, columns: Iterable[str]) -> str:
    cols = set(columns)
    if set(NLI_COLUMNS) <= cols:
        return "nli"
    if set(PAIR_COLUMNS) <= cols:
        return "triplet" if negative_columns(columns) else "pair"
    raise DataError(f"{source}: columns found: {', '.join(map(str, columns)) or '(none)'}; expected "
                    f"{', '.join(NLI_COLUMNS)} (NLI) or {', '.join(PAIR_COLUMNS)}[, negative | negative_1 ... "
                    f"negative_k | negatives] (pairs/triplets)")


def negative_columns(columns: Iterable[str]) -> list[str]:
    """The negative columns of a pair file, in order: negative, negative_1, negative_2, ..., negatives (a list)."""
    numbered = sorted((int(c.rsplit("_", 1)[1]), c) for c in columns
                      if isinstance(c, str) and c.startswith("negative_") and c.rsplit("_", 1)[1].isdigit())
    return ([c for c in ("negative",) if c in columns] + [c for _, c in numbered]
            + [c for c in ("negatives",) if c in columns])


def _row_negatives(row: dict, columns: list[str]) -> list[str | None]:
    """A row's negative texts (None for an empty one); a `negatives` list column gives one per item."""
    out: list[str | None] = []
    for c in columns:
        value = row.get(c)
        if c == "negatives" and isinstance(value, str):  # a TSV/CSV cell: one text
            value = [value]
        out.extend(cell_text(v) for v in value) if isinstance(value, (list, tuple)) else out.append(cell_text(value))
    return out


CHUNK_ROWS = 50_000


def _ids(values: array) -> np.ndarray:
    return np.frombuffer(values, dtype=np.int64) if len(values) else np.empty(0, dtype=np.int64)


def _nli_row(row: dict, stats: DataStats) -> tuple[str, str, str] | None:
    """(label, premise, hypothesis) of one NLI row, or None for a row that is skipped (and counted)."""
    stats.rows += 1
    if row.get(MALFORMED):
        stats.skip(row[MALFORMED])
        return None
    raw_label = row.get("label")
    label = nli_label(raw_label)
    if label is None:
        stats.skip("no gold label (-1/-)" if _no_gold(raw_label) else "unknown label")
        return None
    premise, hypothesis = cell_text(row.get("premise")), cell_text(row.get("hypothesis"))
    if premise is None or hypothesis is None:
        stats.skip(_unusable_text([row.get("premise"), row.get("hypothesis")]))
        return None
    return label, premise, hypothesis


def nli_examples(rows: Iterable[dict], hard_negatives: bool, stats: DataStats, intern: Callable[[str, int], int]
                 ) -> Iterator[np.ndarray]:
    """Entailment pairs; with hard_negatives, (premise, entailment, contradictions ...) rows, as text ids.

    Negatives rule: hypotheses are grouped by premise; every entailment of a premise gets all of its
    m distinct contradictions (at most MAX_NLI_NEGATIVES), the i-th entailment's list starting at the
    (i mod m)-th (so one negative per query is the (i mod m)-th contradiction).  An entailment whose premise
    has no contradiction is dropped (counted as "no contradiction for premise"), so every row has a real
    hard negative.
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
    yield _nli_negatives(ent_p, ent_h, con_p, con_h, stats)


def _nli_negatives(ent_p: np.ndarray, ent_h: np.ndarray, con_p: np.ndarray, con_h: np.ndarray, stats: DataStats
                   ) -> np.ndarray:
    """(premise, entailment, its premise's distinct contradictions ...) rows, -1 padded; the i-th entailment's
    negatives start at the (i mod m)-th of its premise's m contradictions (so the first negative column is
    the one-negative rule)."""
    pairs = np.unique(np.stack([con_p, con_h], axis=1), axis=0) if len(con_p) else np.empty((0, 2), np.int64)
    con_p, con_h = pairs[:, 0], pairs[:, 1]  # each premise's distinct contradictions, grouped by premise
    lo, hi = np.searchsorted(con_p, ent_p, "left"), np.searchsorted(con_p, ent_p, "right")
    m = hi - lo
    starts = np.r_[0, np.flatnonzero(ent_p[1:] != ent_p[:-1]) + 1]  # ent_p is grouped by premise
    i = np.arange(len(ent_p)) - np.repeat(starts, np.diff(np.r_[starts, len(ent_p)]))  # i-th entailment of its premise
    has = m > 0
    stats.skip("no contradiction for premise", int((~has).sum()))
    ent_p, ent_h, lo, m, i = ent_p[has], ent_h[has], lo[has], m[has], i[has]
    stats.skip(f"contradiction beyond {MAX_NLI_NEGATIVES} per premise (not used)",
               int(np.maximum(m - MAX_NLI_NEGATIVES, 0).sum()))
    width = int(min(m.max(), MAX_NLI_NEGATIVES)) if len(m) else 1
    j = np.arange(width)
    neg = np.where(j < m[:, None], con_h[np.minimum(lo[:, None] + (i[:, None] + j) % np.maximum(m, 1)[:, None],
                                                    len(con_h) - 1)] if len(con_h) else NO_TEXT, NO_TEXT)
    return np.concatenate([ent_p[:, None], ent_h[:, None], neg], axis=1)


def pair_examples(source: str, rows: Iterable[dict], hard_negatives: bool, negatives: list[str], stats: DataStats,
                  intern: Callable[[str, int], int]) -> Iterator[np.ndarray]:
    """(anchor, positive, negatives ...) text id rows, -1 padded to the chunk's widest row.  A row whose
    negative cells are all empty is skipped (counted) when the source has negative columns."""
    if hard_negatives and not negatives:
        raise DataError(f"{source}: --hard-negatives needs a 'negative' column (or negative_1 ... negative_k, or "
                        f"NLI premise/hypothesis/label rows); pass --no-hard-negatives (or leave the choice to "
                        f"the default, auto) to train on its anchor/positive pairs")
    chunk: list[list[int]] = []
    for row in rows:
        stats.rows += 1
        if row.get(MALFORMED):
            stats.skip(row[MALFORMED])
            continue
        texts = [cell_text(row.get(role)) for role in PAIR_COLUMNS]
        found = [t for t in _row_negatives(row, negatives) if t is not None]
        if None in texts or (negatives and not found):
            failing = [row.get(c) for c, t in zip(PAIR_COLUMNS, texts) if t is None] or [
                v for c in negatives for v in _cells(row.get(c), c == "negatives")]
            stats.skip(_unusable_text(failing))
            continue
        chunk.append([intern(t, QUERY if i == 0 else DOCUMENT) for i, t in enumerate(texts + found)])
        if len(chunk) >= CHUNK_ROWS:
            yield _padded(chunk)
            chunk = []
    if chunk:
        yield _padded(chunk)


def _cells(value, is_list_column: bool) -> list:
    """The raw cells of a column: a list column's items, else the value itself."""
    return list(value) if is_list_column and isinstance(value, (list, tuple)) else [value]


def _padded(rows: list[list[int]]) -> np.ndarray:
    width = max(map(len, rows))
    out = np.full((len(rows), width), NO_TEXT, dtype=np.int64)
    for r, ids in enumerate(rows):
        out[r, :len(ids)] = ids
    return out


def _repeats_a_text(ids: np.ndarray) -> np.ndarray:
    """(rows,) whether an example holds one text twice (empty slots aside)."""
    bad = np.zeros(len(ids), dtype=bool)
    for a in range(ids.shape[1]):
        for b in range(a + 1, ids.shape[1]):
            bad |= (ids[:, a] == ids[:, b]) & (ids[:, a] != NO_TEXT)
    return bad


def map_ids(ids: np.ndarray, table: np.ndarray) -> np.ndarray:
    """`table[id]` for every text id of `ids`, the empty (NO_TEXT) slots kept as they are."""
    ids = np.asarray(ids)
    return np.where(ids == NO_TEXT, NO_TEXT, np.asarray(table)[np.maximum(ids, 0)])


def drop_repeats(ids: np.ndarray, stats: DataStats, compared: np.ndarray | None = None) -> np.ndarray:
    """`ids` without the examples that hold one text twice, counted as skipped; `compared` (same shape): other
    ids of the same texts to compare instead (e.g. the bare texts behind prompted ids)."""
    bad = _repeats_a_text(ids if compared is None else compared)
    if not bad.any():
        return ids
    stats.skip("same text twice in one example", int(bad.sum()))
    return ids[~bad]


def iter_examples(specs: str | list[str], hard_negatives: bool | None, stats: DataStats,
                  intern: Callable[[str, int], int]) -> Iterator[tuple[int, np.ndarray]]:
    """Every source read as a stream: (source index, (rows, 2 + negatives) text ids) chunks, with counted skips
    in `stats`.  hard_negatives None (auto): negatives from each source that has them.

    An example with the same text twice (anchor equal to positive, ...) is skipped and counted."""
    for source, spec in enumerate(split_specs(specs)):
        columns, rows = read_source(spec)
        schema = detect_schema(spec, columns)
        negatives = negative_columns(columns) if hard_negatives is not False else []
        chunks = (nli_examples(rows, hard_negatives is not False, stats, intern) if schema == "nli"
                  else pair_examples(spec, rows, bool(hard_negatives), negatives, stats, intern))
        for ids in chunks:
            ids = drop_repeats(ids, stats)
            stats.examples += len(ids)
            if len(ids):
                yield source, ids


def no_examples_error(specs: str | list[str], stats: DataStats) -> DataError:
    return DataError(f"{', '.join(split_specs(specs))}: no usable examples ({stats.summary()})")


def load_examples(specs: str | list[str], hard_negatives: bool) -> tuple[Examples, DataStats]:
    """All examples as Python strings (small data, tests and benchmarks; training reads `mnr.store`)."""
    stats = DataStats()
    index: dict[str, int] = {}
    chunks = [ids for _, ids in iter_examples(specs, hard_negatives, stats, lambda t, role: index.setdefault(t, len(index)))]
    if stats.examples == 0:
        raise no_examples_error(specs, stats)
    texts = list(index)
    ids = pad_rows(chunks)
    anchors, positives = ([texts[t] for t in col] for col in ids[:, :2].T.tolist())
    if ids.shape[1] == 2:
        return Examples(anchors, positives), stats
    negatives = [[texts[t] for t in row if t != NO_TEXT] for row in ids[:, 2:].tolist()]
    return Examples(anchors, positives, negatives), stats


def pad_rows(chunks: list[np.ndarray], dtype=np.int64) -> np.ndarray:
    """Chunks of example rows of different widths -> one (rows, widest) array, -1 padded."""
    width = max(c.shape[1] for c in chunks)
    return np.concatenate([np.pad(c.astype(dtype, copy=False), ((0, 0), (0, width - c.shape[1])),
                                  constant_values=NO_TEXT) for c in chunks])


def default_cache_dir() -> str:
    """$MNR_CACHE (`~` expanded), else ~/.cache/mnr."""
    return os.path.expanduser(os.environ.get("MNR_CACHE") or os.path.join("~", ".cache", "mnr"))


def env_int(name: str, default: int, minimum: int = 1) -> int:
    """The integer in environment variable `name` (unset or empty: `default`); DataError naming the variable
    for anything else than an integer >= minimum.  Read when used, never at import."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise DataError(f"environment variable {name}={text!r} is not an integer >= {minimum}; set it to one, or "
                        f"unset it for the default ({default})")
    return value
