"""The token store's on-disk format: its files, how a store is named (the fingerprint), checked and opened.

Layout of one store (a directory `store-<fingerprint>` in the cache dir):
  tokens.bin     int32   token ids of all distinct texts, concatenated
  offsets.bin    int64   (n_texts + 1,) text t is tokens[offsets[t]:offsets[t+1]]
  examples.npy   int32   (n_examples, 2 + K) text id of each example's anchor, positive and negatives, -1 where
                         an example has fewer than K (the widest example's) negatives
  sources.npy    int16   (n_examples,) which source (index into manifest["sources"]) each example comes from
  lengths.npy    int32   (n_examples,) token length of each example's longest text (what its batch pads to)
  bare_text.npy  int32   (n_texts,) the id of each text's bare text (the same text without its prompt; each text's
                         own id when the store has no prompts): what "no text twice in a batch" compares
  manifest.json          counts, file sizes, data stats and what the fingerprint was made of; written last

A store whose manifest or file sizes do not match, or whose arrays do not have the manifest's shapes, is not
trusted (`check_store`).  The fingerprint covers the sources (path, size and mtime of local files; `datasets`'
fingerprint of hub splits; their order, not their `*weight`), the hard-negatives mode (on, off, auto), the
token policy (`TokenPolicy.fingerprint`: the tokenizer's whole state, its sides, lower-casing), max_seq_length
and the query/document prompts.  Every process maps
the files read-only: N processes on a node share one copy in the page cache, and no per-text Python object is
held while training.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from mnr.backbone import token_policy
from mnr.data import NO_TEXT, DataError, DataStats, is_local, load_hub, map_ids

STORE_VERSION = 3  # 2: k negatives per example (-1 padded) and sources.npy; 3: bare_text.npy
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
    """(fingerprint, what it was made of); `tokenizer`: the run's TokenPolicy (or a tokenizer: its default
    policy), whose fingerprint covers the tokenizer's whole state, its sides and lower-casing; `prompts` =
    (query prompt, document prompt), or one such pair per source."""
    what = {"version": STORE_VERSION, "sources": [source_identity(s) for s in specs],
            "hard_negatives": hard_negatives, "tokenizer": token_policy(tokenizer, max_seq_length).fingerprint(),
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
