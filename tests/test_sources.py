"""Issue 13: one source per global batch, k hard negatives per query, hard negatives "auto"."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import token_texts, write_tsv
from mnr.batching import Collator, GlobalBatchSampler, choose_negatives, make_loader, steps_per_source
from mnr.config import ConfigError, TrainConfig, parse_config
from mnr.data import DataError, load_examples
from mnr.loss import mnr_loss
from mnr.train import negatives_plan


def two_sources(n_a=400, n_b=100, roles=2):
    """Distinct texts per example; example i of source s uses texts [i * roles, i * roles + roles)."""
    n = n_a + n_b
    text_ids = np.arange(n * roles, dtype=np.int32).reshape(n, roles)
    return text_ids, np.r_[np.zeros(n_a, np.int16), np.ones(n_b, np.int16)]


def sources_of(sampler, epoch):
    return [set(sampler.sources[b].tolist()) for b in sampler.global_batches(epoch)]


def make(text_ids, sources, **kw):
    sampler = GlobalBatchSampler(text_ids, kw.pop("batch_size", 4), kw.pop("world_size", 1), kw.pop("rank", 0),
                                 kw.pop("seed", 7), sources=sources, **kw)
    sampler.sources = sources
    return sampler


# ---- one source per global batch ------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", ["proportional", "round-robin", "temperature:3"])
def test_every_global_batch_holds_one_source_and_no_text_twice(sampling):
    text_ids, sources = two_sources()
    text_ids[::7, 1] = 5  # clashing positives: the no-duplicate rule has work to do
    sampler = make(text_ids, sources, world_size=2, sampling=sampling)
    for epoch in range(2):
        batches = sampler.global_batches(epoch)
        assert all(len(s) == 1 for s in sources_of(sampler, epoch))
        for b in batches:
            texts = text_ids[b].reshape(-1)
            assert len(set(texts.tolist())) == len(texts)
        assert sampler.batch_sources(epoch).tolist() == [sources[b[0]] for b in batches]


def test_mixing_or_one_source_keeps_todays_batches():
    text_ids, sources = two_sources()
    plain = GlobalBatchSampler(text_ids, 4, seed=7)
    mixed = GlobalBatchSampler(text_ids, 4, seed=7, sources=None)
    one = GlobalBatchSampler(text_ids, 4, seed=7, sources=np.zeros(len(text_ids), np.int16))
    assert np.array_equal(plain.global_batches(1), mixed.global_batches(1))
    assert np.array_equal(plain.global_batches(1), one.global_batches(1))
    assert one.batch_sources(0) is None and one.steps_by_source(0, 3) is None
    assert any(len(s) == 2 for s in [set(sources[b].tolist()) for b in mixed.global_batches(0)])


def test_step_shares_follow_the_rule_and_the_weights():
    batches = np.array([100, 25])
    assert steps_per_source(batches, np.ones(2), "proportional").tolist() == [100, 25]
    assert steps_per_source(batches, np.array([1.0, 4.0]), "proportional").tolist() == [63, 62]
    assert steps_per_source(batches, np.ones(2), "round-robin").tolist() == [63, 62]
    assert steps_per_source(batches, np.array([3.0, 1.0]), "round-robin").tolist() == [94, 31]
    assert steps_per_source(batches, np.ones(2), "temperature:2").tolist() == [83, 42]  # sqrt(4):1 = 2:1


def test_round_robin_alternates_and_cycles_the_small_source():
    text_ids, sources = two_sources(400, 40)
    sampler = make(text_ids, sources, sampling="round-robin")
    order = sampler.batch_sources(0).tolist()
    assert order[:6] == [0, 1, 0, 1, 0, 1] and order.count(1) == 55  # 110 steps, 10 batches of source 1 cycled
    steps = sampler.steps_by_source(0, 10)
    assert steps == {"0": 5, "1": 5}


def test_weighted_proportional_uses_weights_and_stays_deterministic_and_resumable():
    text_ids, sources = two_sources()
    sampler = make(text_ids, sources, weights=[1, 4], source_names=["a", "b"])
    assert np.bincount(sampler.batch_sources(0)).tolist() == [63, 62]
    again = make(text_ids, sources, weights=[1, 4], source_names=["a", "b"])
    assert np.array_equal(sampler.global_batches(3), again.global_batches(3))  # a function of (seed, epoch)
    assert not np.array_equal(sampler.global_batches(0), sampler.global_batches(1))
    resumed = make(text_ids, sources, weights=[1, 4], world_size=2, rank=1, batch_size=2)
    assert np.array_equal(resumed.local_batches(1, 40), resumed.local_batches(1)[40:])
    assert sampler.steps_by_source(2, 0) == {"a": 126, "b": 124}


def test_a_source_smaller_than_one_global_batch_and_bad_weights_are_errors():
    text_ids, sources = two_sources(100, 3)
    with pytest.raises(ValueError, match="source b has 3 usable examples.*--mix-sources"):
        make(text_ids, sources, source_names=["a", "b"])
    text_ids, sources = two_sources()
    with pytest.raises(ValueError, match=r"source weights \[1.0\] are invalid"):
        make(text_ids, sources, weights=[1])


# ---- config errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("flags,message", [
    (["--source-sampling", "temperature:0"], "source_sampling='temperature:0' is invalid"),
    (["--source-sampling", "random"], "source_sampling='random' is invalid"),
    (["--train-data", "a.tsv,b.tsv", "--source-weights", "1,-2"], "source_weights='1,-2' is invalid"),
    (["--train-data", "a.tsv,b.tsv", "--source-weights", "1"], r"one weight per --train-data source \(2\)"),
    (["--train-data", "a.tsv*x,b.tsv"], "the weight 'x' after"),
    (["--train-data", "a.tsv*2,b.tsv", "--source-weights", "1,1"], "not both"),
    (["--train-data", "a.tsv*2,b.tsv", "--mix-sources"], "mix_sources=True is invalid.*ignored"),
    (["--train-data", "a.tsv,b.tsv", "--source-weights", "1,2", "--mix-sources"], "mix_sources=True is invalid"),
    (["--negatives-per-query", "0"], "negatives_per_query='0' is invalid"),
    (["--negatives-per-query", "many"], "negatives_per_query='many' is invalid"),
])
def test_bad_source_and_negative_flags_name_the_value(flags, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(flags)


def test_weights_from_a_yaml_list_or_the_spec(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train_data: a.tsv,b.tsv\nsource_weights: [2, 1]\nnegatives_per_query: 3\n")
    cfg = parse_config(["--config", str(path)])
    assert cfg.weights == [2.0, 1.0] and cfg.k_negatives == 3
    assert TrainConfig(train_data="a.tsv*3, b.tsv").weights == [3.0, 1.0]
    assert TrainConfig(negatives_per_query="all").k_negatives is None


# ---- k negatives: reading, choosing, the loss --------------------------------------------------------------


def test_negative_columns_and_a_negatives_list_are_read_in_order(tmp_path):
    tsv = write_tsv(tmp_path / "k.tsv", ["anchor", "positive", "negative_2", "negative_1", "negative_3"],
                    [["a1", "p1", "n2", "n1", "n3"], ["a2", "p2", "", "m1", ""], ["a3", "p3", "", "", ""]])
    ex, stats = load_examples(str(tsv), hard_negatives=None)
    assert ex.all_negatives == [["n1", "n2", "n3"], ["m1"]] and ex.columns()[2] == ["n1", "m1"]
    assert stats.skipped["empty or missing text"] == 1  # no negative at all in a file that has them
    jsonl = tmp_path / "k.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in [{"anchor": "a", "positive": "p", "negatives": ["x", "y"]},
                                                            {"anchor": "b", "positive": "q", "negatives": ["z"]}]))
    assert load_examples(str(jsonl), hard_negatives=True)[0].all_negatives == [["x", "y"], ["z"]]


def test_nli_gives_every_contradiction_of_the_premise(tmp_path):
    rows = [["p1", "e1", "entailment"], ["p1", "e2", "entailment"], ["p1", "c1", "contradiction"],
            ["p1", "c2", "contradiction"], ["p1", "c3", "contradiction"], ["p2", "e3", "entailment"],
            ["p2", "c4", "contradiction"]]
    ex, _ = load_examples(str(write_tsv(tmp_path / "n.tsv", ["premise", "hypothesis", "label"], rows)), None)
    assert ex.all_negatives == [["c1", "c2", "c3"], ["c2", "c3", "c1"], ["c4"]]


def test_k_of_more_negatives_are_drawn_per_epoch_and_fewer_are_masked():
    rows = np.array([[0, 1, 10, 11, 12, 13], [2, 3, 20, -1, -1, -1], [4, 5, 30, 31, 32, -1]])
    idx = np.arange(3)
    chosen, valid = choose_negatives(rows, idx, 2, seed=1, epoch=0)
    again, _ = choose_negatives(rows, idx, 2, seed=1, epoch=0)
    assert np.array_equal(chosen, again)  # a function of (seed, epoch, example)
    assert set(chosen[0, 2:]) <= {10, 11, 12, 13} and len(set(chosen[0, 2:])) == 2
    assert valid.tolist() == [[True, True], [True, False], [True, True]]
    assert chosen[1].tolist() == [2, 3, 20, 3]  # the empty slot holds the positive, masked out
    epochs = {tuple(choose_negatives(rows, idx, 2, seed=1, epoch=e)[0][0, 2:]) for e in range(8)}
    assert len(epochs) > 1  # a different draw in other epochs
    exact = np.array([[0, 1, 7], [2, 3, 8]])
    assert np.array_equal(choose_negatives(exact, np.arange(2), 1, 0, 5)[0], exact)  # exactly k: unchanged


def test_the_loader_carries_the_mask_and_the_sampler_ignores_empty_slots():
    rows = np.array([[2 * i, 2 * i + 1, 100 + i if i % 2 else -1] for i in range(8)], dtype=np.int32)
    sampler = GlobalBatchSampler(rows, 4, seed=0)
    assert sampler.steps_in_epoch(0) == 2  # the -1 slots never clash
    tokens = [[5, 6, 7]] * 200
    batch = next(iter(make_loader(sampler, Collator(token_texts(tokens), rows, 0, 1, masked=True), 0)))
    assert batch["negative_mask"].shape == (4, 1)
    assert batch["negative_mask"][:, 0].tolist() == [bool(i % 2) for i in batch["example_indices"].tolist()]
    # the empty slots are not embedded: 4 anchors + 4 positives + the real negatives; row_index restores 12 rows
    real = int(batch["negative_mask"].sum())
    assert real < 4 and batch["input_ids"].shape[0] == 8 + real and batch["row_index"].shape == (12,)


def test_empty_slots_are_not_embedded_and_row_index_restores_every_row():
    """The rows left out are exactly the empty slots; input_ids[row_index] is the batch with every slot filled
    by its positive (as the loss sees it), and a batch without empty slots has no row_index."""
    rows = np.array([[0, 1, 10, 11], [2, 3, 20, -1], [4, 5, -1, -1]], dtype=np.int32)
    tokens = {t: [t + 100] * (1 + t % 3) for t in range(40)}
    token_list = [tokens[t] for t in range(40)]
    batch = Collator(token_texts(token_list), rows, 0, 2, masked=True)(np.arange(3))
    chosen, valid = choose_negatives(rows, np.arange(3), 2, 0, 0)
    full = chosen.T.reshape(-1)  # role-major, empty slots holding the positive
    expanded = batch["input_ids"][batch["row_index"]]
    assert batch["input_ids"].shape[0] == 6 + int(valid.sum()) == 9
    for r, t in enumerate(full.tolist()):
        n = len(tokens[t])
        assert expanded[r, :n].tolist() == tokens[t] and not expanded[r, n:].any()
    exact = np.array([[0, 1, 10], [2, 3, 20]], dtype=np.int32)
    assert "row_index" not in Collator(token_texts(token_list), exact, 0, 1, masked=True)(np.arange(2))


def _uneven_negatives(tmp_path) -> Path:
    """32 pairs; every 4th has 3 negatives, the others 1: at --negatives-per-query all most slots are empty, and
    the processes of a launch embed different numbers of rows."""
    rows = [[f"a man {i} is here", f"a person {i} is here", *(f"no {i} {j}" for j in range(3 if i % 4 == 0 else 1))]
            for i in range(32)]
    data = tmp_path / "k.jsonl"
    data.write_text("".join(json.dumps({"anchor": r[0], "positive": r[1], "negatives": r[2:]}) + "\n" for r in rows))
    return data


def _k_all_args(tiny_model, data, cache) -> list[str]:
    return ["--model", str(tiny_model), "--train-data", str(data), "--eval-data", "none", "--max-steps", "3",
            "--lr", "1e-3", "--warmup-ratio", "0", "--negatives-per-query", "all", "--max-seq-length", "32",
            "--report-to", "none", "--no-progress", "--cache-dir", str(cache)]


def test_training_without_embedding_empty_slots_gives_the_weights_of_embedding_them(tmp_path, tiny_model,
                                                                                   monkeypatch):
    """3 steps at --negatives-per-query all on data where most slots are empty: the same weights (dropout off)
    as the same run with every slot embedded (the collator's row_index switched off)."""
    from conftest import load_weights, max_abs_diff
    from mnr import batching
    from mnr.train import main

    args = [*_k_all_args(tiny_model, _uneven_negatives(tmp_path), tmp_path / "cache"), "--batch-size", "8"]
    assert main([*args, "--output-dir", str(tmp_path / "shared")]) == 0
    assert main([*args, "--mini-batch-size", "5", "--output-dir", str(tmp_path / "shared_gradcache")]) == 0
    monkeypatch.setattr(batching, "_without_empty_slots", lambda valid: (slice(None), None))
    assert main([*args, "--output-dir", str(tmp_path / "every")]) == 0
    every = load_weights(tmp_path / "every")
    assert max_abs_diff(load_weights(tmp_path / "shared"), every) < 1e-5
    assert max_abs_diff(load_weights(tmp_path / "shared_gradcache"), every) < 1e-5


def test_masked_negatives_are_no_candidates():
    gen = torch.Generator().manual_seed(0)
    a, p, n1, n2 = (torch.randn(4, 8, generator=gen) for _ in range(4))
    mask = torch.tensor([[True, False], [True, True], [False, False], [True, False]])
    masked = mnr_loss(a, p, [n1, n2], negative_mask=mask)
    kept = torch.cat([n1[mask[:, 0]], n2[mask[:, 1]]])
    assert float(masked) == pytest.approx(float(mnr_loss(a, p, kept)), abs=1e-6)
    assert float(mnr_loss(a, p, [n1, n2])) == pytest.approx(float(mnr_loss(a, p, torch.cat([n1, n2]))), abs=1e-6)


# ---- hard negatives "auto" --------------------------------------------------------------------------------


def test_auto_uses_negatives_when_the_data_has_them_and_says_so():
    auto = TrainConfig()
    k, masked, line = negatives_plan(auto, 0, np.zeros(5), np.zeros(5), ["pairs.tsv"])
    assert (k, masked) == (0, False) and line == ("hard negatives: none, training on pairs (auto: the data has "
                                                  "no negatives)")
    k, masked, line = negatives_plan(auto, 5, np.array([1, 5, 1, 0]), np.array([0, 0, 0, 1]), ["nli", "pairs"])
    assert (k, masked) == (1, True)
    assert line.startswith("hard negatives: 1 per query (auto: the data has them, at most 5 per example)")
    assert "1 of 4 examples have fewer than 1" in line and "no negatives in pairs" in line
    k, masked, _ = negatives_plan(TrainConfig(negatives_per_query="all"), 5, np.array([1, 5]), np.zeros(2), ["n"])
    assert (k, masked) == (5, True)
    with pytest.raises(DataError, match="negatives_per_query='6' is more than any example has"):
        negatives_plan(TrainConfig(negatives_per_query="6"), 5, np.array([5]), np.zeros(1), ["n"])


def test_auto_reads_pairs_and_hard_negatives_still_refuses_them(tmp_path):
    pairs = write_tsv(tmp_path / "p.tsv", ["anchor", "positive"], [["a", "b"], ["c", "d"]])
    assert load_examples(str(pairs), None)[0].all_negatives is None
    with pytest.raises(DataError, match="--hard-negatives needs a 'negative' column"):
        load_examples(str(pairs), True)


# ---- end to end (tiny model) ------------------------------------------------------------------------------


def test_two_sources_train_with_one_source_per_batch_and_count_steps(tmp_path, tiny_model, nli_file, caplog):
    from conftest import train_args
    from mnr.train import main

    pairs = write_tsv(tmp_path / "pairs.tsv", ["anchor", "positive"],
                      [[f"a small dog {i} runs", f"the dog {i} is running"] for i in range(24)])
    out = tmp_path / "run"
    with caplog.at_level("INFO", logger="mnr"):
        assert main(train_args(tiny_model, f"{nli_file},{pairs}*2", out, "--max-steps", "4", "--log-steps", "2",
                               "--eval-data", "none", "--source-sampling", "round-robin")) == 0
    assert "hard negatives: 1 per query (auto: the data has them" in caplog.text
    assert "no negatives in " + str(pairs) in caplog.text  # the pair source: in-batch negatives only
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    counts = [r["steps_per_source"] for r in logged if "steps_per_source" in r]
    assert [sum(c.values()) for c in counts] == [2, 4] and min(counts[-1].values()) >= 1


@pytest.mark.slow
def test_two_processes_embedding_different_row_counts_train_like_one_process(tmp_path, tiny_model):
    """Without the empty slots the processes of a launch embed different numbers of rows (and GradCache runs a
    different number of chunks on each): 2 processes x 4 still train the weights of 1 process x 8."""
    from conftest import load_weights, max_abs_diff
    from mnr.train import main
    from test_distributed import MULTI_GPU, launch

    args = [*_k_all_args(tiny_model, _uneven_negatives(tmp_path), tmp_path / "token-cache"), "--mini-batch-size", "3"]
    assert main([*args, "--batch-size", "8", "--output-dir", str(tmp_path / "one")]) == 0
    launch(MULTI_GPU, ["train_mnr.py", *args, "--batch-size", "4", "--output-dir", str(tmp_path / "two")], tmp_path)
    assert max_abs_diff(load_weights(tmp_path / "two"), load_weights(tmp_path / "one")) < 5e-5
