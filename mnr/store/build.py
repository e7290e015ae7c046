"""The build of a token store: texts read as a stream, interned by hash, tokenised once each, written as the
files of mnr/store/format.py.

  * Sources are read as a stream; texts are deduplicated by a 128-bit BLAKE2b hash of their UTF-8 bytes;
    new texts are tokenised in chunks on a background thread with the fast tokenizer's own thread pool
    (every core), while the main thread reads and hashes the next rows.
  * Prompts: a query (anchor) is stored as query_prompt + text, a document (positive, negative) as
    document_prompt + text, prompt first, lower-cased when the TokenPolicy says so, then hashed and tokenised
    (the prompt counts in max_seq_length); so
    one text that is a query here and a document there is two token sequences when the prompts differ.
  * Split over processes (mnr/store/team.py), chunk c of the new texts is member c % n's to tokenise
    (`tokenise_share`), and `assemble` joins the shares in text-id order: the files are byte for byte those of a
    build in one process.
  * Built into a temporary directory renamed into place only when complete.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import uuid
from array import array
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from mnr.backbone import token_policy
from mnr.data import (DOCUMENT, NO_TEXT, QUERY, DataError, DataStats, drop_repeats, iter_examples, map_ids,
                      no_examples_error, pad_rows)
from mnr.data import env_int
from mnr.store.format import FILES, STORE_VERSION, Prompts, per_source

# texts per tokenizer call: big enough for its thread pool, small enough to overlap reading and to share the work
# between processes evenly; 0: $MNR_TOKENISE_CHUNK or 20_000, read when a build starts (`tokenise_chunk`)
TOKENISE_CHUNK = 0


def tokenise_chunk() -> int:
    return TOKENISE_CHUNK or env_int("MNR_TOKENISE_CHUNK", 20_000)


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest(), "little")


# Files of a split build in its temporary directory, for member m: the UTF-8 texts of its chunks and their int64
# byte offsets, then their token ids and token lengths.
_PARTS = {"text": "text-{}.bin", "off": "text-{}.off", "tok": "tok-{}.bin", "len": "len-{}.npy"}


def _part(kind: str, member: int) -> str:
    return _PARTS[kind].format(member)


class _TextTable:
    """Interns texts (prompt + text, by the role's prompt) by hash and tokenises each new one once, in id order.

    New texts go out in chunks of `tokenise_chunk()`.  With one member (a build in one machine) every chunk is
    tokenised here on a background thread, straight into tokens.bin, while the next rows are read.  With
    `members` > 1 (a build split over processes) chunk c is written out as UTF-8 for member c % members to
    tokenise once the reading is done (`tokenise_share`), this process's share (member 0) included: reading
    never waits for tokenising, so the other members start as early as they can."""

    def __init__(self, tokenizer, max_seq_length: int, directory: Path, prompts: list[tuple[str, str]],
                 members: int = 1):
        self.chunk = tokenise_chunk()
        self.tokenizer, self.max_seq_length = tokenizer, max_seq_length
        self.policy = token_policy(tokenizer, max_seq_length)
        self.backend = self.policy.backend()
        self.per_source = [tuple(map(self.policy.case, pair)) for pair in prompts]  # cased as the texts
        self.prompts = {QUERY: self.per_source[0][0], DOCUMENT: self.per_source[0][1]}  # the current source's (`use`)
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
        text = self.policy.case(text)
        prompted = self.prompts[role] + text
        key = _hash(prompted)
        t = self.ids.get(key)
        if t is None:
            t = self.ids[key] = len(self.ids)
            self.pending.append(prompted)
            if self.raw is not None:
                self.raw_of.append(self.raw.setdefault(_hash(text), len(self.raw)))
            if len(self.pending) >= self.chunk:
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
        values, lengths = self.policy.token_ids(texts, self.backend)
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


def tokenise_share(directory: Path, member: int, tokenizer, max_seq_length: int) -> int:
    """Member `member`'s part of a split build: tokenise the texts the builder wrote out for it (`text-<m>.*` in
    the build's temporary directory) into `tok-<m>.bin` and `len-<m>.npy`; returns how many texts."""
    ends = np.fromfile(directory / _part("off", member), dtype=np.int64)
    blob = np.memmap(directory / _part("text", member), dtype=np.uint8, mode="r") if ends[-1] else b""
    policy = token_policy(tokenizer, max_seq_length)
    backend = policy.backend()
    lengths = []
    with tokenizer_threads(), open(directory / _part("tok", member), "wb") as out:
        chunk = tokenise_chunk()
        for start in range(0, len(ends) - 1, chunk):
            bounds = ends[start:start + chunk + 1] - ends[start]
            raw = bytes(blob[ends[start]:ends[start] + bounds[-1]])
            bounds = bounds.tolist()
            texts = [raw[a:b].decode("utf-8") for a, b in zip(bounds, bounds[1:])]
            values, chunk_lengths = policy.token_ids(texts, backend)
            out.write(values.tobytes())
            lengths.append(chunk_lengths)
    np.save(directory / _part("len", member), np.concatenate(lengths) if lengths else np.empty(0, np.int64))
    return len(ends) - 1


def assemble(directory: Path, chunk_sizes: list[int], members: int) -> np.ndarray:
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
def no_cyclic_gc():
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
def tokenizer_threads():
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


class Build:
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
            assemble(tmp, self.table.chunk_sizes, self.members)
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
