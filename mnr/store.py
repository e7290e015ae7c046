"""Token store: the token ids of every distinct training text in flat arrays on disk, memory-mapped.

Layout of one store (a directory `store-<fingerprint>` in the cache dir):
  tokens.bin    int32   token ids of all distinct texts, concatenated
  offsets.bin   int64   (n_texts + 1,) text t is tokens[offsets[t]:offsets[t+1]]
  examples.npy  int32   (n_examples, 2 + K) text id of each example's anchor, positive and negatives, -1 where
                        an example has fewer than K (the widest example's) negatives
  sources.npy   int16   (n_examples,) which source (index into manifest["sources"]) each example comes from
  lengths.npy   int32   (n_examples,) token length of each example's longest text (what its batch pads to)
  manifest.json         counts, file sizes, data stats and what the fingerprint was made of

Invariants:
  * Built once, by one process per filesystem (a file lock; the others wait for it, then map the result),
    into a temporary directory renamed into place only when complete: a crash or Ctrl-C mid-build leaves
    nothing that a later run trusts.  A store whose manifest or file sizes do not match is rebuilt.
  * The fingerprint covers the sources (path, size and mtime of local files; `datasets`' fingerprint of hub
    splits; their order, not their `*weight`), the hard-negatives mode (on, off, auto), the tokenizer (class,
    vocabulary, lower-casing), max_seq_length and the query/document prompts.
  * Every process maps the files read-only: N processes on a node share one copy in the page cache, and no
    per-text Python object is held while training.
  * Prompts: a query (anchor) is stored as query_prompt + text, a document (positive, negative) as
    document_prompt + text, prompt first, then hashed and tokenised (the prompt counts in max_seq_length); so
    one text that is a query here and a document there is two token sequences when the prompts differ.
  * Sources are read as a stream; texts are deduplicated by a 128-bit BLAKE2b hash of their UTF-8 bytes;
    new texts are tokenised in chunks on a background thread with the fast tokenizer's own thread pool
    (every core), while the main thread reads and hashes the next rows.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import uuid
from array import array
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from itertools import chain
from pathlib import Path

import numpy as np

from mnr.data import (DOCUMENT, NO_TEXT, QUERY, DataError, DataStats, default_cache_dir, drop_repeats, is_local,
                      iter_examples, load_hub, map_ids, no_examples_error, pad_rows, split_specs)

logger = logging.getLogger(__name__)

STORE_VERSION = 3  # 2: k negatives per example (-1 padded) and sources.npy; 3: bare_text.npy
TOKENISE_CHUNK = 20_000  # texts per tokenizer call: big enough for its thread pool, small enough to overlap reading
FILES = ("tokens.bin", "offsets.bin", "examples.npy", "sources.npy", "lengths.npy", "bare_text.npy")


class TokenTexts:
    """Read-only view: `texts[t]` is the int32 token ids of distinct text t (a slice of the mapped array)."""

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, path: Path | None = None):
        self.tokens, self.offsets, self.path = tokens, offsets, path

    def __reduce__(self):  # to a spawned DataLoader worker: the path, mapped again there (not a copy of the data)
        return (_map_texts, (self.path,)) if self.path is not None else super().__reduce__()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, t) -> np.ndarray:
        return self.tokens[self.offsets[t]:self.offsets[t + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def _map_texts(path: Path) -> TokenTexts:
    return open_store(path).token_ids


class TokenStore:
    """An opened store: `text_ids` (n_examples, 2 + max_negatives), `sources` and `lengths` (n_examples,),
    `token_ids[t]`, `stats`, `source_names` and `negatives_per_example` ((n_examples,) how many it has)."""

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        tokens = np.memmap(self.path / "tokens.bin", dtype=np.int32, mode="r") if manifest["n_tokens"] else \
            np.empty(0, dtype=np.int32)
        offsets = np.memmap(self.path / "offsets.bin", dtype=np.int64, mode="r")
        self.token_ids = TokenTexts(tokens, offsets, self.path)
        self.text_ids = np.load(self.path / "examples.npy", mmap_mode="r")
        self.lengths = np.load(self.path / "lengths.npy", mmap_mode="r")
        self.sources = np.load(self.path / "sources.npy", mmap_mode="r")
        self.bare_text = np.load(self.path / "bare_text.npy", mmap_mode="r")
        self.source_names: list[str] = manifest["sources"]
        stats = manifest["stats"]
        self.stats = DataStats(rows=stats["rows"], examples=stats["examples"])
        self.stats.skipped.update(stats["skipped"])

    def __len__(self) -> int:
        return self.text_ids.shape[0]

    @property
    def n_roles(self) -> int:
        return self.text_ids.shape[1]

    @property
    def n_texts(self) -> int:
        return len(self.token_ids)

    @property
    def max_negatives(self) -> int:
        return self.n_roles - 2

    def same_text_ids(self) -> np.ndarray:
        """`text_ids` with every text named by the id of its bare text (no prompt): what the sampler's "no text
        twice in a global batch" rule compares, so a text that is one example's query and another's document
        (two ids when the prompts differ) is still never in one batch twice.  `text_ids` itself without prompts."""
        if not self.manifest.get("prompted"):
            return self.text_ids
        return map_ids(self.text_ids, self.bare_text)

    def negatives_per_example(self) -> np.ndarray:
        return (np.asarray(self.text_ids[:, 2:]) != NO_TEXT).sum(axis=1)


# ---------------------------------------------------------------------------------------------
# fingerprint, open, validate

Prompts = tuple[str, str] | list[tuple[str, str]]  # (query prompt, document prompt), or one pair per source


def per_source(prompts, n_sources: int) -> list[tuple[str, str]]:
    """One (query, document) prompt pair per source: a single pair is every source's."""
    if isinstance(prompts, tuple):
        return [prompts] * max(n_sources, 1)
    if len(prompts) != n_sources:
        raise DataError(f"{len(prompts)} prompt pairs for {n_sources} sources: give one per source")
    return [tuple(p) for p in prompts]



def tokenizer_identity(tokenizer) -> str:
    digest = hashlib.sha256()
    for part in (type(tokenizer).__name__, str(len(tokenizer)), str(getattr(tokenizer, "name_or_path", "")),
                 json.dumps(getattr(tokenizer, "init_kwargs", {}).get("do_lower_case"))):
        digest.update(part.encode() + b"\0")
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return digest.hexdigest()


def source_identity(spec: str) -> dict:
    if is_local(spec):
        path = os.path.abspath(spec)
        try:
            st = os.stat(path)
        except OSError:
            return {"path": path}  # reading it names the problem
        return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {"hub": spec, "fingerprint": getattr(load_hub(spec), "_fingerprint", None)}


def store_fingerprint(specs: list[str], hard_negatives: bool | None, tokenizer, max_seq_length: int,
                      prompts: Prompts = ("", "")) -> tuple[str, dict]:
    """(fingerprint, what it was made of); `prompts` = (query prompt, document prompt), or one such pair per
    source."""
    what = {"version": STORE_VERSION, "sources": [source_identity(s) for s in specs],
            "hard_negatives": hard_negatives, "tokenizer": tokenizer_identity(tokenizer),
            "max_seq_length": max_seq_length}
    pairs = sorted(set(per_source(prompts, len(specs))))
    if len(pairs) > 1:
        what["prompts"] = [{"query": q, "document": d} for q, d in per_source(prompts, len(specs))]
    elif any(pairs[0]):  # without prompts a store is the one built before prompts existed: its fingerprint stays
        what["prompts"] = {"query": pairs[0][0], "document": pairs[0][1]}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:24], what


def check_store(path: Path, fingerprint: str) -> str | None:
    """None when the store at `path` is complete and matches; else why it cannot be trusted."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except FileNotFoundError:
        return "no manifest"
    except (OSError, ValueError) as err:
        return f"unreadable manifest ({err})"
    if not isinstance(manifest, dict) or manifest.get("fingerprint") != fingerprint:
        return "manifest of another build"
    for name in FILES:
        try:
            size = (path / name).stat().st_size
        except OSError:
            return f"{name} missing"
        if size != manifest.get("sizes", {}).get(name):
            return f"{name} has {size} bytes, the manifest says {manifest.get('sizes', {}).get(name)}"
    return None


def open_store(path: Path) -> TokenStore:
    return TokenStore(path, json.loads((Path(path) / "manifest.json").read_text()))


# ---------------------------------------------------------------------------------------------
# build


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest(), "little")


class _TextTable:
    """Interns texts (prompt + text, by the role's prompt) by hash and tokenises each new one once, appending
    to tokens.bin in id order."""

    def __init__(self, tokenizer, max_seq_length: int, directory: Path, prompts: list[tuple[str, str]]):
        self.tokenizer, self.max_seq_length = tokenizer, max_seq_length
        self.backend = backend_for(tokenizer, max_seq_length)
        self.prompts = {QUERY: prompts[0][0], DOCUMENT: prompts[0][1]}  # the current source's (`use`)
        self.per_source = prompts
        self.ids: dict[int, int] = {}  # 128-bit hash -> text id (integers only: no text is kept)
        # Different prompts: a text as query and as document get two ids; the id of the bare text of each
        # (raw_of[text id]) still finds an example with the same text twice (see `drop_same_text`).
        self.raw: dict[int, int] | None = {} if len({p for pair in prompts for p in pair}) > 1 else None
        self.raw_of = array("q") if self.raw is not None else None
        self.pending: list[str] = []
        self.text_lengths = array("q")
        self.n_tokens = 0
        self.tokens = open(directory / "tokens.bin", "wb")
        self.pool = ThreadPoolExecutor(1)  # one writer keeps the order; the tokenizer itself uses every core
        self.inflight = None

    def use(self, source: int) -> None:
        """Prompt the texts that follow with this source's prompts."""
        self.prompts = {QUERY: self.per_source[source][0], DOCUMENT: self.per_source[source][1]}

    def intern(self, text: str, role: int = DOCUMENT) -> int:
        prompted = self.prompts[role] + text
        key = _hash(prompted)
        t = self.ids.get(key)
        if t is None:
            t = self.ids[key] = len(self.ids)
            self.pending.append(prompted)
            if self.raw is not None:
                self.raw_of.append(self.raw.setdefault(_hash(text), len(self.raw)))
            if len(self.pending) >= TOKENISE_CHUNK:
                self._flush()
        return t

    def _flush(self) -> None:
        texts, self.pending = self.pending, []
        if self.inflight is not None:
            self.inflight.result()  # at most one chunk in flight: memory stays one chunk
        self.inflight = self.pool.submit(self._write, texts)

    def _write(self, texts: list[str]) -> None:
        values, lengths = encode(self.tokenizer, texts, self.max_seq_length, self.backend)
        self.tokens.write(values.tobytes())
        self.text_lengths.extend(lengths.tolist())
        self.n_tokens += len(values)

    def finish(self) -> np.ndarray:
        """Tokenise what is left, close tokens.bin; returns the (n_texts,) token lengths."""
        if self.pending:
            self._flush()
        if self.inflight is not None:
            self.inflight.result()
        self.pool.shutdown()
        self.tokens.close()
        self.ids.clear()
        self.raw = None
        return np.frombuffer(self.text_lengths, dtype=np.int64) if self.text_lengths else np.empty(0, np.int64)

    def bare_text(self, n_texts: int) -> np.ndarray:
        """(n_texts,) int32: the id of each text's bare text (itself, without prompts)."""
        if self.raw_of is None:
            return np.arange(n_texts, dtype=np.int32)
        return np.frombuffer(self.raw_of, dtype=np.int64).astype(np.int32)

    def drop_same_text(self, ids: np.ndarray, stats: DataStats) -> np.ndarray:
        """The examples of `ids` without one text twice (a query equal to its positive or negative, which the
        prompts gave different ids), the rest counted as skipped."""
        if self.raw_of is None:
            return ids
        kept = drop_repeats(ids, stats, map_ids(ids, np.frombuffer(self.raw_of, dtype=np.int64)))
        stats.examples -= len(ids) - len(kept)  # iter_examples counted them before the bare texts were compared
        return kept

    def abort(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.tokens.close()


def backend_for(tokenizer, max_seq_length: int):
    """A copy of the fast tokenizer's Rust backend, truncating like `tokenizer(..., truncation=True,
    max_length=max_seq_length)` and never padding; None for a slow (Python) tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    fast = Tokenizer.from_str(backend.to_str())
    fast.no_padding()
    fast.enable_truncation(max_seq_length, direction=getattr(tokenizer, "truncation_side", "right"))
    return fast


def encode(tokenizer, texts: list[str], max_seq_length: int, backend=None) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of `texts` (truncated at max_seq_length, special tokens added, no padding), flattened:
    (int32 values, int64 lengths).  With the Rust backend only the ids cross into Python (the wrapper's
    per-text dict of masks would cost more than the tokenising)."""
    if backend is not None:  # encode_batch_fast (tokenizers >= 0.21) skips the character offsets: ~20% less CPU
        batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
        ids = [e.ids for e in batch(texts, add_special_tokens=True)]
    else:
        ids = tokenizer(texts, truncation=True, max_length=max_seq_length, add_special_tokens=True)["input_ids"]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    values = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
    return values, lengths


@contextmanager
def _no_cyclic_gc():
    """The cyclic garbage collector off while reading: the build allocates millions of short-lived containers
    (rows, id lists) and creates no reference cycles, and every full collection would walk all the objects the
    process holds (a loaded model and its libraries: seconds per pass at scale)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@contextmanager
def _tokenizer_threads():
    """The fast tokenizer's thread pool on for the build (tests and launchers often set it off for forking)."""
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def build_store(specs: list[str], tokenizer, max_seq_length: int, hard_negatives: bool | None, final: Path,
                fingerprint: str, what: dict, prompts: Prompts = ("", "")) -> None:
    """Read, dedupe, tokenise and write a store into a temporary directory, then rename it to `final`."""
    tmp = final.parent / f"{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    table = None
    try:
        table = _TextTable(tokenizer, max_seq_length, tmp, per_source(prompts, len(specs)))
        stats = DataStats()
        with _tokenizer_threads(), _no_cyclic_gc():
            chunks, sources = [], []
            for source, spec in enumerate(specs):  # one source at a time: each with its own prompts
                table.use(source)
                for _, ids in iter_examples([spec], hard_negatives, stats, table.intern):
                    ids = table.drop_same_text(ids, stats)
                    chunks.append(ids.astype(np.int32))
                    sources.append(np.full(len(ids), source, dtype=np.int16))
            text_lengths = table.finish()
        if stats.examples == 0:
            raise no_examples_error(specs, stats)
        if len(text_lengths) >= 2**31:
            raise DataError(f"{len(text_lengths)} distinct texts: more than a 32-bit text id can name")
        examples = pad_rows(chunks, np.int32)
        del chunks
        offsets = np.zeros(len(text_lengths) + 1, dtype=np.int64)
        np.cumsum(text_lengths, out=offsets[1:])
        offsets.tofile(tmp / "offsets.bin")
        np.save(tmp / "examples.npy", examples)
        np.save(tmp / "sources.npy", np.concatenate(sources))
        np.save(tmp / "bare_text.npy", table.bare_text(len(text_lengths)))
        lengths = np.where(examples == NO_TEXT, 0, np.append(text_lengths, 0)[examples]).max(axis=1)
        np.save(tmp / "lengths.npy", lengths.astype(np.int32))
        manifest = {"fingerprint": fingerprint, "version": STORE_VERSION, "n_examples": len(examples),
                    "sources": specs, "prompted": table.raw_of is not None,
                    "n_roles": examples.shape[1], "n_texts": len(text_lengths), "n_tokens": int(offsets[-1]),
                    "sizes": {name: (tmp / name).stat().st_size for name in FILES},
                    "stats": {"rows": stats.rows, "examples": stats.examples, "skipped": dict(stats.skipped)},
                    "built_from": what}
        for name in FILES:  # on disk before the manifest that vouches for them
            with open(tmp / name, "rb+") as fh:
                os.fsync(fh.fileno())
        with open(tmp / "manifest.json", "w") as fh:
            json.dump(manifest, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        if table is not None:
            table.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prepare_train_store(specs: str | list[str], tokenizer, max_seq_length: int, hard_negatives: bool | None,
                        cache_dir: str = "", prompts: Prompts = ("", "")) -> TokenStore:
    """The token store of these sources, built if missing or damaged, then memory-mapped; `prompts` =
    (query prompt, document prompt), put before the anchors and before the positives and negatives.

    Safe to call from every process at once: the first to take the store's file lock builds, the others
    wait on the lock and map the finished store (one build per filesystem, so one per node with node-local
    cache dirs)."""
    from filelock import FileLock

    specs = split_specs(specs)
    if not specs:
        raise DataError("no training data given")
    cache = Path(cache_dir or default_cache_dir())
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create the token cache dir {cache} ({err.strerror}); "
                        f"pass a writable --cache-dir") from None
    fingerprint, what = store_fingerprint(specs, hard_negatives, tokenizer, max_seq_length, prompts)
    final = cache / f"store-{fingerprint}"
    if check_store(final, fingerprint) is None:
        return open_store(final)
    with FileLock(str(final) + ".lock"):
        problem = check_store(final, fingerprint)
        if problem is None:  # another process built it while this one waited
            return open_store(final)
        if final.exists():
            logger.warning("token store %s cannot be trusted (%s): rebuilding it", final, problem)
            trash = final.parent / f"{final.name}.bad-{uuid.uuid4().hex[:8]}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        for stale in cache.glob(f"{final.name}.tmp-*"):  # left by a killed build (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        logger.info("building the token store %s", final)
        build_store(specs, tokenizer, max_seq_length, hard_negatives, final, fingerprint, what, prompts)
    return open_store(final)
