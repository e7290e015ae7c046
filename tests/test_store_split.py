"""A store built by several machines together: each machine's first process tokenises a share of the texts.

The machines are threads here, joined by a gather made of a barrier (the real one is `all_gather_object` over
the process group; `tests/test_distributed.py` runs it for real with two `accelerate launch` machines).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from conftest import ThreadTeam, nli_rows, write_tsv
from mnr.store import build as store_build
from mnr.store import team as store_team
from mnr.data import DataError
from mnr.store import FILES, prepare_train_store


@pytest.fixture()
def tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def _share_by(monkeypatch, fn) -> None:
    """Every member tokenises its share with fn: the leader's own in the build, the others' in the team."""
    monkeypatch.setattr(store_build, "tokenise_share", fn)
    monkeypatch.setattr(store_team, "tokenise_share", fn)


def _data(tmp_path: Path) -> str:
    return str(write_tsv(tmp_path / "nli.tsv", ["premise", "hypothesis", "label"], nli_rows(40)))


def _files(store) -> dict[str, bytes]:
    return {name: (store.path / name).read_bytes() for name in FILES}


def test_machines_sharing_the_cache_dir_split_the_tokenising_and_write_the_one_process_files(
        tmp_path, tok, monkeypatch):
    monkeypatch.setattr(store_build, "TOKENISE_CHUNK", 3)  # many chunks: every machine gets several
    data = _data(tmp_path)
    alone = prepare_train_store(data, tok, 16, True, str(tmp_path / "alone"))
    team = ThreadTeam(3)
    stores = team.run(lambda r: prepare_train_store(data, tok, 16, True, str(tmp_path / "shared"), team=team.member(r)))
    assert all(not isinstance(s, BaseException) for s in stores), stores
    assert len({s.path for s in stores}) == 1  # one store, mapped by all three
    built = stores[0].manifest["built_by"]
    assert built["processes"] == 3 and sum(built["texts"]) == alone.n_texts and min(built["texts"]) > 0
    assert _files(stores[0]) == _files(alone)  # byte for byte what one process writes
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == [stores[0].path.name]  # the lock file gone
    # warm: every process finds it complete, one gather, nothing rebuilt
    mtime = (stores[0].path / "manifest.json").stat().st_mtime_ns
    again = ThreadTeam(3)
    assert all(s.path == stores[0].path for s in again.run(
        lambda r: prepare_train_store(data, tok, 16, True, str(tmp_path / "shared"), team=again.member(r))))
    assert again.calls == [1, 1, 1] and (stores[0].path / "manifest.json").stat().st_mtime_ns == mtime


def test_machines_with_their_own_cache_dirs_each_build_their_own(tmp_path, tok):
    """Ranks 0-1 are one machine (cache dir a), ranks 2-3 another (cache dir b): each machine's first process
    builds its machine's copy alone, the other process of each machine only maps it."""
    data = _data(tmp_path)
    team = ThreadTeam(4)
    stores = team.run(lambda r: prepare_train_store(data, tok, 16, True, str(tmp_path / ("a" if r < 2 else "b")),
                                                    team=team.member(r, local_main=r in (0, 2))))
    assert all(not isinstance(s, BaseException) for s in stores), stores
    assert [s.path.parent.name for s in stores] == ["a", "a", "b", "b"]
    assert [s.manifest["built_by"]["processes"] for s in stores] == [1, 1, 1, 1]
    assert _files(stores[0]) == _files(stores[2])


class PythonTokenizer:
    """A tokenizer without a Rust backend (as a Python-only tokenizer is): it tokenises on one core."""

    def __init__(self, tok):
        self._tok, self.name_or_path, self.init_kwargs = tok, "python-" + tok.name_or_path, tok.init_kwargs

    def __call__(self, *args, **kwargs):
        return self._tok(*args, **kwargs)

    def __len__(self):
        return len(self._tok)

    def get_vocab(self):
        return self._tok.get_vocab()


def test_with_a_python_tokenizer_every_process_of_a_machine_takes_a_share(tmp_path, tok, monkeypatch):
    """One machine, two processes: a fast tokenizer's thread pool already uses every core (rank 0 alone
    tokenises); a Python tokenizer uses one, so both processes tokenise a share."""
    monkeypatch.setattr(store_build, "TOKENISE_CHUNK", 3)
    data = _data(tmp_path)
    built = {}
    for name, tokenizer in (("fast", tok), ("python", PythonTokenizer(tok))):
        team = ThreadTeam(2)
        stores = team.run(lambda r: prepare_train_store(data, tokenizer, 16, True, str(tmp_path / name),
                                                        team=team.member(r, local_main=r == 0)))
        assert all(not isinstance(s, BaseException) for s in stores), stores
        built[name] = stores[0]
    assert built["fast"].manifest["built_by"]["processes"] == 1
    shares = built["python"].manifest["built_by"]
    assert shares["processes"] == 2 and min(shares["texts"]) > 0
    assert _files(built["python"]) == _files(built["fast"])


def test_a_machine_failing_its_share_stops_every_process_and_leaves_nothing(tmp_path, tok, monkeypatch):
    monkeypatch.setattr(store_build, "TOKENISE_CHUNK", 3)
    data = _data(tmp_path)
    real = store_build.tokenise_share

    def disk_full(directory, member, *args):
        if member == 1:
            raise OSError(28, "No space left on device")
        return real(directory, member, *args)

    _share_by(monkeypatch, disk_full)
    team = ThreadTeam(3)
    cache = tmp_path / "shared"
    errors = team.run(lambda r: prepare_train_store(data, tok, 16, True, str(cache), team=team.member(r)))
    assert all(isinstance(e, OSError) and "No space left" in str(e) for e in errors), errors
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []  # no store, temp dir, probe
    _share_by(monkeypatch, real)
    assert len(prepare_train_store(data, tok, 16, True, str(cache))) > 0  # the lock was released


def test_bad_data_is_the_same_clear_error_on_every_process(tmp_path, tok):
    data = str(write_tsv(tmp_path / "n.tsv", ["premise", "hypothesis", "label"], [["p", "h", "neutral"]]))
    team = ThreadTeam(2)
    errors = team.run(lambda r: prepare_train_store(data, tok, 16, False, str(tmp_path / "c"), team=team.member(r)))
    assert all(isinstance(e, DataError) and "no usable examples" in str(e) for e in errors), errors


def test_the_assembly_of_shares_refuses_a_short_share(tmp_path):
    """A share with fewer tokenised texts than it was given (a damaged part file) is an error, not a shifted
    store."""
    d = tmp_path
    np.save(d / "len-0.npy", np.array([1, 2], np.int64))
    np.save(d / "len-1.npy", np.array([2], np.int64))  # given 2 texts, tokenised 1
    np.array([7, 8], np.int32).tofile(d / "tok-1.bin")
    np.array([1, 2, 3], np.int32).tofile(d / "tok-0.bin")
    with pytest.raises(DataError, match="machine 1 was given 2 texts and returned 1 lengths"):
        store_build.assemble(d, [2, 2], 2)
    np.save(d / "len-1.npy", np.array([1, 2], np.int64))  # 2 lengths, but 3 tokens for a 2-token file
    with pytest.raises(DataError, match="machine 1 .* summing to 3 tokens, with 2 tokens"):
        store_build.assemble(d, [2, 2], 2)


def test_an_error_that_cannot_be_pickled_still_reaches_every_process(tmp_path, tok, monkeypatch):
    class Unpicklable(Exception):
        def __init__(self, msg):
            super().__init__(msg)
            self.handle = threading.Lock()  # a lock does not pickle

    def broken(*args, **kwargs):
        raise Unpicklable("the tokenizer broke")

    _share_by(monkeypatch, broken)
    monkeypatch.setattr(store_build, "TOKENISE_CHUNK", 3)
    team = ThreadTeam(2)
    errors = team.run(lambda r: prepare_train_store(_data(tmp_path), tok, 16, True, str(tmp_path / "c"),
                                                    team=team.member(r)))
    assert all(isinstance(e, RuntimeError) and "Unpicklable: the tokenizer broke" in str(e) for e in errors), errors
