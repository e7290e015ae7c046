"""Token store: built once per fingerprint, memory-mapped, atomic, rebuilt when damaged; same batches as lists."""

import json
import logging

import numpy as np
import pytest

from conftest import nli_rows, token_texts, write_tsv
from mnr.backbone import TokenPolicy
from mnr.batching import Collator
from mnr.data import DataError, load_examples
from mnr.store import check_store, prepare_train_store


@pytest.fixture()
def tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def _triplets(tmp_path):
    return write_tsv(tmp_path / "t.tsv", ["anchor", "positive", "negative"],
                     [["a man is playing", "a person plays", "a dog sleeps"],
                      ["a man is playing", "the boy runs", "a dog sleeps"]])


def test_each_distinct_text_is_tokenised_once_into_flat_mapped_arrays(tmp_path, tok):
    store = prepare_train_store(str(_triplets(tmp_path)), tok, 6, True, str(tmp_path / "cache"))
    assert len(store) == 2 and store.n_roles == 3 and store.n_texts == 4  # unique texts tokenised once
    assert store.text_ids.tolist() == [[0, 1, 2], [0, 3, 2]]  # ids in order of first appearance
    assert isinstance(store.token_ids.tokens, np.memmap) and store.token_ids.tokens.dtype == np.int32
    for t, text in enumerate(["a man is playing", "a person plays", "a dog sleeps", "the boy runs"]):
        assert store.token_ids[t].tolist() == tok(text, truncation=True, max_length=6)["input_ids"]  # truncated
    assert store.lengths.tolist() == [max(len(store.token_ids[t]) for t in row) for row in store.text_ids.tolist()]
    assert store.stats.summary() == "2 rows read, 2 examples kept"
    dirs = list((tmp_path / "cache").glob("store-*[!k]"))
    assert len(dirs) == 1 and json.loads((dirs[0] / "manifest.json").read_text())["n_texts"] == 4
    mtime = (dirs[0] / "manifest.json").stat().st_mtime_ns
    again = prepare_train_store(str(_triplets(tmp_path).parent / "t.tsv"), tok, 6, True, str(tmp_path / "cache"))
    assert (dirs[0] / "manifest.json").stat().st_mtime_ns == mtime  # mapped, not rebuilt
    assert again.text_ids.tolist() == store.text_ids.tolist()
    other = prepare_train_store(str(tmp_path / "t.tsv"), tok, 5, True, str(tmp_path / "cache"))  # new max length
    assert other.path != store.path


def test_nli_store_holds_the_same_examples_and_stats_as_the_reader(tmp_path, tok):
    rows = nli_rows(30) + [["p x", "p x", "entailment"], ["p x", "c y", "contradiction"]]
    path = write_tsv(tmp_path / "nli.tsv", ["premise", "hypothesis", "label"], rows)
    for hard in (True, False):
        examples, stats = load_examples(str(path), hard)
        store = prepare_train_store(str(path), tok, 32, hard, str(tmp_path / "cache"))
        texts = {}
        for col, ids in zip(examples.columns(), store.text_ids.T.tolist()):
            for text, t in zip(col, ids):
                assert texts.setdefault(t, text) == text  # one id per text, the same text for every use
        assert store.stats.summary() == stats.summary()


def test_collating_from_the_store_equals_collating_from_lists(tmp_path, tok):
    path = write_tsv(tmp_path / "nli.tsv", ["premise", "hypothesis", "label"], nli_rows(20))
    store = prepare_train_store(str(path), tok, 32, True, str(tmp_path / "cache"))
    as_lists = [store.token_ids[t].tolist() for t in range(store.n_texts)]
    idx = [3, 0, 7, 11]
    a = Collator(store.token_ids, store.text_ids, tok.pad_token_id)(idx)
    b = Collator(token_texts(as_lists), np.asarray(store.text_ids), tok.pad_token_id)(idx)
    assert all(bool((a[k] == b[k]).all()) and a[k].shape == b[k].shape for k in a)
    assert a["input_ids"].shape[0] == 3 * len(idx)


@pytest.mark.parametrize("damage", ["truncate", "empty", "manifest", "header", "shape"])
def test_a_damaged_store_is_detected_and_rebuilt(tmp_path, tok, caplog, damage):
    path = str(_triplets(tmp_path))
    store = prepare_train_store(path, tok, 6, True, str(tmp_path / "cache"))
    want = store.text_ids.tolist(), [store.token_ids[t].tolist() for t in range(store.n_texts)]
    target = store.path / {"manifest": "manifest.json", "header": "examples.npy", "shape": "lengths.npy"}.get(
        damage, "tokens.bin")
    data = target.read_bytes()
    if damage == "header":  # damaged in place: same size, unreadable
        target.write_bytes(b"garbag" + data[6:])
    elif damage == "shape":  # same size, another shape: (1, 2) int32 instead of (2,)
        np.save(target, np.zeros((1, 2), np.int32))
        assert len(target.read_bytes()) == len(data)
    else:
        target.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    assert check_store(store.path, store.manifest["fingerprint"]) is not None
    with caplog.at_level(logging.WARNING, logger="mnr.store"):
        again = prepare_train_store(path, tok, 6, True, str(tmp_path / "cache"))
    assert "rebuilding" in caplog.text
    assert (again.text_ids.tolist(), [again.token_ids[t].tolist() for t in range(again.n_texts)]) == want


def test_an_interrupted_build_leaves_nothing_a_later_run_trusts(tmp_path, tok, monkeypatch):
    path = str(_triplets(tmp_path))
    cache = tmp_path / "cache"

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(TokenPolicy, "token_ids", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_train_store(path, tok, 6, True, str(cache))
    assert not [p for p in cache.iterdir() if not p.name.endswith(".lock")]  # no store, no temp dir
    monkeypatch.undo()
    assert len(prepare_train_store(path, tok, 6, True, str(cache))) == 2


def test_no_usable_example_is_an_error_naming_the_skips(tmp_path, tok):
    path = write_tsv(tmp_path / "n.tsv", ["premise", "hypothesis", "label"], [["p", "h", "neutral"]])
    with pytest.raises(DataError, match=r"no usable examples \(1 row read, 0 examples kept; skipped: 1 neutral"):
        prepare_train_store(str(path), tok, 32, False, str(tmp_path / "cache"))
    assert not [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")]


def test_a_pickled_store_view_maps_the_files_again_instead_of_copying_them(tmp_path, tok):
    import pickle

    store = prepare_train_store(str(_triplets(tmp_path)), tok, 6, True, str(tmp_path / "cache"))
    blob = pickle.dumps(store.token_ids)
    assert len(blob) < 1000  # a path, not the arrays
    again = pickle.loads(blob)
    assert [again[t].tolist() for t in range(len(again))] == [store.token_ids[t].tolist() for t in range(store.n_texts)]


def test_an_unusable_cache_dir_is_a_clear_error(tmp_path, tok):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(DataError, match="cannot create the token cache dir .*a-file/sub.*writable --cache-dir"):
        prepare_train_store(str(_triplets(tmp_path)), tok, 6, True, str(blocker / "sub"))


def test_the_fast_path_tokenises_exactly_like_the_tokenizer_call(tok):
    """The store's Rust path (no offsets, no padding) gives the ids of tokenizer(..., truncation=True)."""
    texts = ["A Man, playing!", "Café au lait — naïve résumé", "漢字 and kana かな mixed", "x" * 300,
             "word " * 40, "tabs\tand\nnewlines", "ünïcödé ÀÉÎ", "   padded   "]
    for max_len in (6, 32):
        policy = TokenPolicy.of(tok, max_len)
        values, lengths = policy.token_ids(texts, policy.backend())
        expected = tok(texts, truncation=True, max_length=max_len)["input_ids"]
        assert lengths.tolist() == [len(e) for e in expected]
        assert values.tolist() == [i for e in expected for i in e]
