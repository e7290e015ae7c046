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
  * Built once per filesystem (a file lock; other launches wait for it, then map the result), into a temporary
    directory renamed into place only when complete: a crash or Ctrl-C mid-build leaves nothing that a later
    run trusts.  A store whose manifest or file sizes do not match is rebuilt.
  * The machines of a launch whose cache dirs are one directory build it together (`prepare_train_store`):
    the first process of each machine (every process, with a Python tokenizer, which uses one core) tokenises
    a share of the texts (chunk c is member c % n's), the leader joins the shares in text-id order.  The files
    are byte for byte those of a build in one process.
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
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Callable

import numpy as np

from mnr.collective import together
from mnr.data import (DOCUMENT, NO_TEXT, QUERY, DataError, DataStats, default_cache_dir, drop_repeats, is_local,
                      iter_examples, load_hub, map_ids, no_examples_error, pad_rows, split_specs)

logger = logging.getLogger(__name__)

STORE_VERSION = 3  # 2: k negatives per example (-1 padded) and sources.npy; 3: bare_text.npy
# texts per tokenizer call: big enough for its thread pool, small enough to overlap reading and to share the work
# between processes evenly ($MNR_TOKENISE_CHUNK sets it)
TOKENISE_CHUNK = int(os.environ.get("MNR_TOKENISE_CHUNK") or 20_000)
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
    return _check_arrays(path, manifest)


def _check_arrays(path: Path, manifest: dict) -> str | None:
    """None when the arrays open (their headers read) with the shapes the manifest's counts give; else why not
    (a file damaged in place keeps its size)."""
    try:
        store = TokenStore(path, manifest)
        n, roles, texts = manifest["n_examples"], manifest["n_roles"], manifest["n_texts"]
        want = {"examples.npy": (store.text_ids, (n, roles)), "lengths.npy": (store.lengths, (n,)),
                "sources.npy": (store.sources, (n,)), "bare_text.npy": (store.bare_text, (texts,)),
                "offsets.bin": (store.token_ids.offsets, (texts + 1,))}
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable ({err})"
    for name, (values, shape) in want.items():
        if values.shape != shape:
            return f"{name} has shape {values.shape}, the manifest's counts say {shape}"
    return None


def open_store(path: Path) -> TokenStore:
    return TokenStore(path, json.loads((Path(path) / "manifest.json").read_text()))


# ---------------------------------------------------------------------------------------------
# build


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest(), "little")


# Files of a split build in its temporary directory, for member m: the UTF-8 texts of its chunks and their int64
# byte offsets, then their token ids and token lengths.
_PARTS = {"text": "text-{}.bin", "off": "text-{}.off", "tok": "tok-{}.bin", "len": "len-{}.npy"}


def _part(kind: str, member: int) -> str:
    return _PARTS[kind].format(member)


class _TextTable:
    """Interns texts (prompt + text, by the role's prompt) by hash and tokenises each new one once, in id order.

    New texts go out in chunks of TOKENISE_CHUNK.  With one member (a build in one machine) every chunk is
    tokenised here on a background thread, straight into tokens.bin, while the next rows are read.  With
    `members` > 1 (a build split over processes) chunk c is written out as UTF-8 for member c % members to
    tokenise once the reading is done (`tokenise_share`), this process's share (member 0) included: reading
    never waits for tokenising, so the other members start as early as they can."""

    def __init__(self, tokenizer, max_seq_length: int, directory: Path, prompts: list[tuple[str, str]],
                 members: int = 1):
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
        self.members, self.chunk_sizes = members, []
        self.tokens = open(directory / "tokens.bin", "wb") if members == 1 else None
        self.spills = {m: (open(directory / _part("text", m), "wb"), array("q", [0]))
                       for m in range(members)} if members > 1 else {}
        self.directory = directory
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
        member = len(self.chunk_sizes) % self.members
        self.chunk_sizes.append(len(texts))
        if self.members > 1:
            fh, ends = self.spills[member]
            for text in texts:
                ends.append(ends[-1] + fh.write(text.encode("utf-8")))
            return
        if self.inflight is not None:
            self.inflight.result()  # at most one chunk in flight: memory stays one chunk
        self.inflight = self.pool.submit(self._write, texts)

    def _write(self, texts: list[str]) -> None:
        values, lengths = encode(self.tokenizer, texts, self.max_seq_length, self.backend)
        self.tokens.write(values.tobytes())
        self.text_lengths.extend(lengths.tolist())
        self.n_tokens += len(values)

    def close_reading(self) -> None:
        """The last rows are read: send out the last chunk and close the members' text files (in one machine,
        the last chunks may still be tokenising: `finish`)."""
        if self.pending:
            self._flush()
        for member, (fh, ends) in self.spills.items():
            fh.close()
            np.frombuffer(ends, dtype=np.int64).tofile(self.directory / _part("off", member))
        self.spills = {}

    def finish(self) -> np.ndarray:
        """Tokenise what is left of the chunks tokenised here, close tokens.bin; returns their token lengths."""
        self.close_reading()
        if self.inflight is not None:
            self.inflight.result()
        self.pool.shutdown()
        if self.tokens is not None:
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
        if self.tokens is not None:
            self.tokens.close()
        for fh, _ in self.spills.values():
            fh.close()


def python_only(tokenizer) -> bool:
    """Whether the tokenizer has no Rust backend (it then tokenises on one core)."""
    return getattr(tokenizer, "backend_tokenizer", None) is None


def backend_for(tokenizer, max_seq_length: int):
    """A copy of the fast tokenizer's Rust backend, truncating like `tokenizer(..., truncation=True,
    max_length=max_seq_length)` and never padding; None for a slow (Python) tokenizer."""
    if python_only(tokenizer):
        return None
    from tokenizers import Tokenizer

    backend = tokenizer.backend_tokenizer

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


def tokenise_share(directory: Path, member: int, tokenizer, max_seq_length: int) -> int:
    """Member `member`'s part of a split build: tokenise the texts the builder wrote out for it (`text-<m>.*` in
    the build's temporary directory) into `tok-<m>.bin` and `len-<m>.npy`; returns how many texts."""
    ends = np.fromfile(directory / _part("off", member), dtype=np.int64)
    blob = np.memmap(directory / _part("text", member), dtype=np.uint8, mode="r") if ends[-1] else b""
    backend = backend_for(tokenizer, max_seq_length)
    lengths = []
    with _tokenizer_threads(), open(directory / _part("tok", member), "wb") as out:
        for start in range(0, len(ends) - 1, TOKENISE_CHUNK):
            bounds = ends[start:start + TOKENISE_CHUNK + 1] - ends[start]
            raw = bytes(blob[ends[start]:ends[start] + bounds[-1]])
            bounds = bounds.tolist()
            texts = [raw[a:b].decode("utf-8") for a, b in zip(bounds, bounds[1:])]
            values, chunk_lengths = encode(tokenizer, texts, max_seq_length, backend)
            out.write(values.tobytes())
            lengths.append(chunk_lengths)
    np.save(directory / _part("len", member), np.concatenate(lengths) if lengths else np.empty(0, np.int64))
    return len(ends) - 1


def _assemble(directory: Path, chunk_sizes: list[int], members: int) -> np.ndarray:
    """A split build's token files joined into tokens.bin in text-id order (chunk c is member c % members's);
    returns the (n_texts,) token lengths.  The part files are removed."""
    lengths = [np.load(directory / _part("len", m)) for m in range(members)]
    tokens = [np.memmap(directory / _part("tok", m), dtype=np.int32, mode="r")
              if (directory / _part("tok", m)).stat().st_size else np.empty(0, np.int32) for m in range(members)]
    for m in range(members):  # a damaged or foreign part would shift every text after it
        given = sum(chunk_sizes[m::members])
        if len(lengths[m]) != given or int(lengths[m].sum()) != len(tokens[m]):
            raise DataError(f"split store build: machine {m} was given {given} texts and returned {len(lengths[m])} "
                            f"lengths summing to {int(lengths[m].sum())} tokens, with {len(tokens[m])} tokens")
    text_at, token_at = [0] * members, [0] * members
    out_lengths = []
    with open(directory / "tokens.bin", "wb") as out:
        for c, n in enumerate(chunk_sizes):
            m = c % members
            chunk = lengths[m][text_at[m]:text_at[m] + n]
            k = int(chunk.sum())
            out.write(tokens[m][token_at[m]:token_at[m] + k].tobytes())
            text_at[m] += n
            token_at[m] += k
            out_lengths.append(chunk)
    for m in range(members):
        for kind in ("text", "off", "tok", "len"):
            (directory / _part(kind, m)).unlink(missing_ok=True)
    return np.concatenate(out_lengths) if out_lengths else np.empty(0, np.int64)


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


class _Build:
    """One store build in a temporary directory beside `final`, in three steps: `read` (stream, dedupe; in one
    process tokenise while reading, split write out each member's texts), `wait` (this process's
    tokenising done), `finish` (join the members' token files, write the arrays and the manifest, rename to
    `final`).  `abort` removes it."""

    def __init__(self, final: Path, members: int = 1):
        self.final, self.members = final, members
        self.tmp = final.parent / f"{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir(parents=True)
        self.table: _TextTable | None = None

    def read(self, specs: list[str], tokenizer, max_seq_length: int, hard_negatives: bool | None,
             prompts: Prompts) -> None:
        self.specs, self.stats = specs, DataStats()
        self.table = _TextTable(tokenizer, max_seq_length, self.tmp, per_source(prompts, len(specs)), self.members)
        chunks, sources = [], []
        for source, spec in enumerate(specs):  # one source at a time: each with its own prompts
            self.table.use(source)
            for _, ids in iter_examples([spec], hard_negatives, self.stats, self.table.intern):
                ids = self.table.drop_same_text(ids, self.stats)
                chunks.append(ids.astype(np.int32))
                sources.append(np.full(len(ids), source, dtype=np.int16))
        self.table.close_reading()
        if self.stats.examples == 0:
            raise no_examples_error(specs, self.stats)
        if len(self.table.ids) >= 2**31:
            raise DataError(f"{len(self.table.ids)} distinct texts: more than a 32-bit text id can name")
        self.examples = pad_rows(chunks, np.int32)
        self.sources = np.concatenate(sources)

    def wait(self) -> None:
        """In one machine: the last chunks tokenised; split: this process's share (member 0) tokenised."""
        self.own_lengths = self.table.finish()
        if self.members > 1:
            tokenise_share(self.tmp, 0, self.table.tokenizer, self.table.max_seq_length)

    def finish(self, fingerprint: str, what: dict) -> None:
        tmp, examples, stats = self.tmp, self.examples, self.stats
        text_lengths = self.own_lengths if self.members == 1 else \
            _assemble(tmp, self.table.chunk_sizes, self.members)
        offsets = np.zeros(len(text_lengths) + 1, dtype=np.int64)
        np.cumsum(text_lengths, out=offsets[1:])
        offsets.tofile(tmp / "offsets.bin")
        np.save(tmp / "examples.npy", examples)
        np.save(tmp / "sources.npy", self.sources)
        np.save(tmp / "bare_text.npy", self.table.bare_text(len(text_lengths)))
        lengths = np.where(examples == NO_TEXT, 0, np.append(text_lengths, 0)[examples]).max(axis=1)
        np.save(tmp / "lengths.npy", lengths.astype(np.int32))
        manifest = {"fingerprint": fingerprint, "version": STORE_VERSION, "n_examples": len(examples),
                    "sources": self.specs, "prompted": self.table.raw_of is not None,
                    "n_roles": examples.shape[1], "n_texts": len(text_lengths), "n_tokens": int(offsets[-1]),
                    "sizes": {name: (tmp / name).stat().st_size for name in FILES},
                    "stats": {"rows": stats.rows, "examples": stats.examples, "skipped": dict(stats.skipped)},
                    "built_by": {"processes": self.members, "texts": self.texts_per_member()},
                    "built_from": what}
        for name in FILES:  # on disk before the manifest that vouches for them
            with open(tmp / name, "rb+") as fh:
                os.fsync(fh.fileno())
        with open(tmp / "manifest.json", "w") as fh:
            json.dump(manifest, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.final)

    def texts_per_member(self) -> list[int]:
        sizes = self.table.chunk_sizes
        return [sum(sizes[m::self.members]) for m in range(self.members)]

    def abort(self) -> None:
        if self.table is not None:
            self.table.abort()
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# prepare: every process of a launch calls it together


def _alone(obj) -> list:
    return [obj]


@dataclass
class Team:
    """The processes of one launch, as the store needs them: this one's `rank`, whether it is the first process
    of its machine (`local_main`: only those build or tokenise), and `gather(obj)`, a collective that every
    process calls with a picklable object and that returns all of them in rank order.  The default is a single
    process."""

    rank: int = 0
    local_main: bool = True
    gather: Callable[[object], list] = _alone


def _builders(team: Team, cache: Path, every_process: bool = False) -> list[int]:
    """The ranks that build this process's store together: the first process of each machine (`every_process`:
    every process) whose cache dir is the same directory as this one's, seen through a probe file each of them
    leaves; [] for a process that takes no part.  The lowest rank of them leads."""
    helps = team.local_main or every_process
    probe = cache / f".probe-{uuid.uuid4().hex}" if helps else None

    def leave_probe():
        if probe is not None:
            try:
                probe.touch()
            except OSError as err:
                raise DataError(f"cannot write to the token cache dir {cache} ({err.strerror}); "
                                f"pass a writable --cache-dir") from None
        return probe and probe.name

    names = together(team.gather, leave_probe)
    try:
        views = together(team.gather, lambda: [r for r, name in enumerate(names)
                                         if name and (cache / name).exists()] if helps else [])
    finally:
        if probe is not None:
            probe.unlink(missing_ok=True)
    if not helps:
        return []
    leader = min(views[team.rank])
    return [r for r, seen in enumerate(views) if seen and min(seen) == leader]


def _replace_stale(final: Path, fingerprint: str) -> bool:
    """Under the store's lock: False when `final` is complete (another launch built it); else True, with a damaged
    store and the temporary dirs of killed builds removed."""
    problem = check_store(final, fingerprint)
    if problem is None:
        return False
    if final.exists():
        logger.warning("token store %s cannot be trusted (%s): rebuilding it", final, problem)
        trash = final.parent / f"{final.name}.bad-{uuid.uuid4().hex[:8]}"
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    for stale in final.parent.glob(f"{final.name}.tmp-*"):  # left by a killed build (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    return True


def prepare_train_store(specs: str | list[str], tokenizer, max_seq_length: int, hard_negatives: bool | None,
                        cache_dir: str = "", prompts: Prompts = ("", ""), team: Team | None = None) -> TokenStore:
    """The token store of these sources, built if missing or damaged, then memory-mapped; `prompts` =
    (query prompt, document prompt), put before the anchors and before the positives and negatives.

    Every process of a launch calls it at once, with its `team` (default: one process).  A store that all find
    complete is mapped.  Else the machines whose cache dirs are one directory (`_builders`) build it together:
    the lowest rank takes the file lock (another launch building it makes this one wait, then map it) and reads,
    then every one of those machines (processes, with a Python tokenizer) tokenises its share, and the leader
    joins the shares and renames.
    Any process's failure is raised on all of them."""
    from filelock import FileLock

    team = team or Team()
    specs, cache = split_specs(specs), Path(cache_dir or default_cache_dir())
    looks = together(team.gather, lambda: _look(cache, specs, hard_negatives, tokenizer, max_seq_length, prompts))
    fingerprint, what, _ = looks[team.rank]
    final = cache / f"store-{fingerprint}"
    if all(ok for _, _, ok in looks):
        return open_store(final)
    # a fast tokenizer uses every core of its machine; a Python one uses one, so every process takes a share
    builders = _builders(team, cache, every_process=python_only(tokenizer))
    leads = bool(builders) and builders[0] == team.rank
    lock = FileLock(str(final) + ".lock")
    build: _Build | None = None

    def read():
        nonlocal build
        if not leads:
            return None
        lock.acquire()
        if not _replace_stale(final, fingerprint):
            return None
        split = f", the tokenising split over {len(builders)} processes" if len(builders) > 1 else ""
        logger.info("building the token store %s%s", final, split)
        build = _Build(final, len(builders))
        build.read(specs, tokenizer, max_seq_length, hard_negatives, prompts)
        return str(build.tmp)

    def tokenise():
        if build is not None:
            build.wait()
        elif builders and not leads and plans[builders[0]] is not None:
            member = builders.index(team.rank)
            n = tokenise_share(Path(plans[builders[0]]), member, tokenizer, max_seq_length)
            logger.info("tokenised %d texts of %s (share %d of %d)", n, final, member + 1, len(builders))

    try:
        with _tokenizer_threads(), _no_cyclic_gc():
            plans = together(team.gather, read)
            together(team.gather, tokenise)
        together(team.gather, lambda: build and build.finish(fingerprint, what))
    except BaseException:
        if build is not None:
            build.abort()
        raise
    finally:
        if lock.is_locked:
            lock.release()
    return open_store(final)


def _look(cache: Path, specs: list[str], hard_negatives, tokenizer, max_seq_length: int, prompts
          ) -> tuple[str, dict, bool]:
    """(fingerprint, what it was made of, whether its store in `cache` is complete); the cache dir is created."""
    if not specs:
        raise DataError("no training data given")
    fingerprint, what = store_fingerprint(specs, hard_negatives, tokenizer, max_seq_length, prompts)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create the token cache dir {cache} ({err.strerror}); "
                        f"pass a writable --cache-dir") from None
    return fingerprint, what, check_store(cache / f"store-{fingerprint}", fingerprint) is None
