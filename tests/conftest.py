"""Shared fixtures: tiny random BERT models built in-test (no downloads), paths to shared data."""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import string
import tempfile
import threading
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Token stores go to a temporary dir of this session, never the user's ~/.cache/mnr (or their $MNR_CACHE). Set at
# import, before the test modules are collected: some copy os.environ for their subprocesses at import time.
SESSION_CACHE = tempfile.mkdtemp(prefix="mnr-test-cache-")
os.environ["MNR_CACHE"] = SESSION_CACHE


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(SESSION_CACHE, ignore_errors=True)


REPO = Path(__file__).resolve().parent.parent
# the shared data folder beside the checkout; MNR_SHARED_DATA points elsewhere (e.g. from a git worktree)
SHARED_DATA = Path(os.environ.get("MNR_SHARED_DATA") or REPO.parent / "shared" / "data")

WORDS = ("a the man woman person people dog cat is are on in with at of and playing sitting running "
         "standing outside inside street water ball child children boy girl two three red blue young "
         "old car house tree grass shirt black white near walking riding bike eating food sleeping").split()


def build_tiny_model(path: Path, *, dropout: float = 0.0, seed: int = 0, layers: int = 2, hidden: int = 32,
                     max_positions: int = 64) -> Path:
    """A random 2-layer BERT with a small WordPiece vocabulary, saved like a hub model (safetensors)."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = special + chars + ["##" + c for c in string.ascii_lowercase + string.digits] + WORDS
    # transformers 5 ignores vocab_file= (every word would be [UNK]); vocab= takes the mapping
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(dict.fromkeys(vocab))}, do_lower_case=True,
                                  model_max_length=max_positions)
    assert tokenizer.tokenize("a man 7")[:2] == ["a", "man"], "tiny tokenizer lost its vocabulary"
    tokenizer.save_pretrained(path)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=4, intermediate_size=hidden * 2, max_position_embeddings=max_positions,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    BertModel(config, add_pooling_layer=False).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """Dropout off: runs are exactly reproducible."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_model_dropout(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-bert-dropout"), dropout=0.1)


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "token-cache"
    monkeypatch.setenv("MNR_CACHE", str(d))
    return d


def write_tsv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
    return path


def nli_rows(n_premises: int = 40) -> list[list[str]]:
    """Synthetic NLI: each premise with one entailment, one neutral, one contradiction; all texts distinct."""
    rows = []
    for i in range(n_premises):
        w = WORDS[i % len(WORDS)]
        p = f"a man {w} {i} is playing outside"
        rows += [[p, f"a person {w} {i} plays", "entailment"], [p, f"the man {w} {i} is young", "neutral"],
                 [p, f"a woman {w} {i} is sleeping", "contradiction"]]
    return rows


@pytest.fixture()
def nli_file(tmp_path) -> Path:
    return write_tsv(tmp_path / "nli.tsv", ["premise", "hypothesis", "label"], nli_rows())


@pytest.fixture()
def sts_file(tmp_path) -> Path:
    rows = []
    for i in range(30):
        w = WORDS[i % len(WORDS)]
        rows.append([f"a dog {w} {i} runs", f"a dog {w} is running {i}", str(float(i % 6))])
    return write_tsv(tmp_path / "sts.tsv", ["sentence1", "sentence2", "score"], rows)


def train_args(model, train, out, *extra) -> list[str]:
    """Flags of a small, quiet, reproducible run of the tiny model; tests append what they vary (last wins)."""
    return ["--model", str(model), "--train-data", str(train), "--output-dir", str(out), "--batch-size", "4",
            "--max-seq-length", "32", "--report-to", "none", "--no-progress", "--seed", "0", *extra]


def shared_file(rel: str) -> Path:
    path = SHARED_DATA / rel
    if not path.exists():
        pytest.skip(f"shared data {rel} not present")
    return path


def free_port() -> int:
    """A free local port for a launch: other test runs may launch at the same time, never the default 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def max_abs_diff(a: dict, b: dict) -> float:
    """Largest absolute difference over all tensors of two state dicts with the same keys."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


class ThreadTeam:
    """n "processes" as threads; gather() is a real collective: it returns only once all n have called it, and
    what it passes is pickled, as between processes.  A barrier that waits past `timeout` s fails the test (a
    process left waiting) instead of hanging it; `local.rank` is the calling thread's rank."""

    def __init__(self, n: int, timeout: float = 60):
        self.n, self.slots, self.barrier = n, [None] * n, threading.Barrier(n, timeout=timeout)
        self.calls = [0] * n
        self.local = threading.local()

    def gather(self, obj) -> list:
        rank = self.local.rank
        self.calls[rank] += 1
        self.slots[rank] = pickle.loads(pickle.dumps(obj))  # what crosses between processes must pickle
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out

    def member(self, rank: int, local_main: bool = True):
        """The store's Team of member `rank`."""
        from mnr.store import Team

        return Team(rank, local_main, self.gather)

    def run(self, fn) -> list:
        """fn(rank) on every member at once; each member's result or exception."""
        results: list = [None] * self.n

        def one(rank):
            self.local.rank = rank
            try:
                results[rank] = fn(rank)
            except BaseException as err:  # noqa: BLE001 - the test looks at it
                results[rank] = err

        threads = [threading.Thread(target=one, args=(r,)) for r in range(self.n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        return results


def token_texts(seqs):
    """Token id lists as the collator takes them (a store's `TokenTexts`: one flat array and its offsets)."""
    import numpy as np

    from mnr.store import TokenTexts

    lengths = [len(s) for s in seqs]
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(offsets[-1]))
    return TokenTexts(tokens, offsets)
