"""Hard-negative mining (mnr/mine.py): the rules on hand-made embeddings whose answers are known, the command on
a tiny random model (its file is read by the trainer's reader), and 1 vs 2 processes giving the same file."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import nli_rows, write_tsv
from mnr.data import DataError, load_examples
from mnr.mine import MineOptions, build_problem, main, mine

# Toy embeddings on the unit circle: score(q, text) = cos(angle difference), so the ranking is known.
ANGLES = {"q": 0, "p": 10, "d1": 5, "d2": 20, "d3": 30, "d4": 40, "d5": 50, "r": 90, "rp": 95,
          "P.": 11, "Q ": 1}


def embed(texts: list[str]) -> torch.Tensor:
    rad = torch.tensor([math.radians(ANGLES[t]) for t in texts], dtype=torch.float64)
    return torch.stack([rad.cos(), rad.sin()], dim=1)


def run(opts: MineOptions, anchors=("q",), positives=("p",), corpus=("d1", "d2", "d3", "d4", "d5")):
    return mine(list(anchors), list(positives), list(corpus), embed, embed, opts)


def negatives(result, query: int = 0) -> list[str]:
    return [result.problem.corpus[i] for i in result.selection.negatives[query]]


def test_top_takes_the_best_candidates_never_the_positive():
    assert negatives(run(MineOptions(num_negatives=2))) == ["d1", "d2"]


def test_positive_duplicates_and_the_query_itself_are_never_mined():
    # "p" again in the corpus (identical text) and the query's own text "q": both excluded
    result = run(MineOptions(num_negatives=3), corpus=("p", "q", "d1", "d2", "d3"))
    assert negatives(result) == ["d1", "d2", "d3"]
    assert result.summary["corpus"] == 5  # p, q, d1, d2, d3: "p" once


def test_case_spacing_and_trailing_punctuation_variants_count_as_the_same_text():
    # "P." is "p" in another case with a full stop, "Q " the query with a trailing space: never negatives
    result = run(MineOptions(num_negatives=2), corpus=("P.", "Q ", "d1", "d2"))
    assert negatives(result) == ["d1", "d2"]
    assert result.summary["corpus"] == 5  # still distinct texts in the corpus (and in the output)


def test_absolute_margin_drops_candidates_too_close_to_the_positive():
    # positive score cos(10°) = 0.985: margin 0 drops d1 (0.996), margin 0.1 also d2 (0.940 > 0.885)
    assert negatives(run(MineOptions(num_negatives=1, margin=0.0))) == ["d2"]
    result = run(MineOptions(num_negatives=1, margin=0.1))
    assert negatives(result) == ["d3"]
    assert result.summary["candidates_skipped"] == {"margin": 2}


def test_relative_margin_is_sentence_transformers_rule():
    # threshold = pos - |pos| x 0.05 = 0.9356: d2 (0.9397) is dropped, d3 (0.866) kept
    result = run(MineOptions(num_negatives=1, relative_margin=0.05))
    assert negatives(result) == ["d3"]
    assert result.summary["candidates_skipped"] == {"relative_margin": 2}


def test_range_window_counts_ranks_among_the_candidates():
    assert negatives(run(MineOptions(num_negatives=2, range_min=1, range_max=3))) == ["d2", "d3"]
    assert negatives(run(MineOptions(num_negatives=2, range_min=3, range_max=10))) == ["d4", "d5"]


def test_random_sampling_is_seeded_in_the_window_and_sorted_by_score():
    picks = set()
    for seed in range(12):
        result = run(MineOptions(num_negatives=2, range_min=1, range_max=5, sampling="random", seed=seed))
        got = negatives(result)
        assert set(got) <= {"d2", "d3", "d4", "d5"} and len(got) == 2
        scores = result.selection.scores[0]
        assert scores == sorted(scores, reverse=True)
        picks.add(tuple(got))
        again = run(MineOptions(num_negatives=2, range_min=1, range_max=5, sampling="random", seed=seed))
        assert negatives(again) == got
    assert len(picks) > 1


def test_shortfall_is_counted_and_the_pair_left_out():
    # margin 0.3 keeps only d5 (0.643 <= 0.685) for "q"; "r" (positive "rp") keeps plenty
    result = run(MineOptions(num_negatives=3, margin=0.3), anchors=("q", "r"), positives=("p", "rp"))
    assert result.summary["queries_with_fewer_than_k"] == 1
    assert result.summary["pairs_left_out"] == 1
    assert [row[0] for row in result.rows] == ["r"]


def test_an_anchor_with_two_positives_excludes_both_and_uses_the_lower_score():
    problem = build_problem(["q", "q"], ["p", "d1"], ["d2"])
    assert problem.queries == ["q"] and problem.excluded == [[0, 1]]
    # positives p (0.985) and d1 (0.996): margin reference 0.985, d2 (0.940) kept under margin 0.04
    result = run(MineOptions(num_negatives=1, margin=0.04), anchors=("q", "q"), positives=("p", "d1"),
                 corpus=("d2", "d3"))
    assert negatives(result) == ["d2"]
    assert len(result.rows) == 2


def test_summary_statistics():
    s = run(MineOptions(num_negatives=2)).summary
    assert s["positive_scores"]["count"] == 1
    assert s["positive_scores"]["mean"] == pytest.approx(math.cos(math.radians(10)), abs=1e-6)
    neg = s["negative_scores"]
    assert neg["count"] == 2 and neg["max"] == pytest.approx(math.cos(math.radians(5)), abs=1e-6)
    assert neg["min"] <= neg["p50"] <= neg["max"]


@pytest.mark.parametrize("opts, bad", [(MineOptions(num_negatives=0), "--num-negatives 0"),
                                       (MineOptions(range_min=5, range_max=3), "--range-max 3"),
                                       (MineOptions(num_negatives=4, range_max=3), "--num-negatives 4"),
                                       (MineOptions(relative_margin=1.5), "--relative-margin 1.5"),
                                       (MineOptions(margin=-1.0), "--margin -1.0"),
                                       (MineOptions(sampling="best"), "--sampling 'best'")])
def test_bad_options_name_the_value(opts, bad):
    with pytest.raises(DataError, match=bad.replace("(", r"\(")):
        opts.check()


def test_memory_for_a_million_texts_is_bounded():
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_mining import memory_bytes

    mem = memory_bytes(1_000_000, 1_000_000, 384, 30)
    assert mem["score_block"] == 1024 * 16384 * 4
    assert mem["embeddings"] == 2_000_000 * 384 * 4


# ---------------------------------------------------------------------------------------------
# the command, on the tiny random model


def _cli(tmp_path, tiny_model, *extra) -> list[str]:
    pairs = write_tsv(tmp_path / "nli.tsv", ["premise", "hypothesis", "label"], nli_rows(12))
    return [str(pairs), "--model", str(tiny_model), "--max-seq-length", "32", "--batch-size", "8", *extra]


def test_command_writes_a_file_the_trainer_reads(tmp_path, tiny_model, capsys):
    out = tmp_path / "mined.tsv"
    assert main(_cli(tmp_path, tiny_model, "--output", str(out), "--num-negatives", "1")) == 0
    header = out.read_text().splitlines()[0].split("\t")
    assert header == ["anchor", "positive", "negative"]
    examples, _ = load_examples(str(out), hard_negatives=True)
    assert len(examples) == 12  # every entailment pair, each with a negative that is not its positive
    assert all(n != p for p, n in zip(examples.positives, examples.columns()[2]))
    summary = json.loads((tmp_path / "mined.tsv.summary.json").read_text())
    assert summary["rows_written"] == 12 and summary["queries"] == 12
    assert "queries with fewer than k negatives: 0" in capsys.readouterr().out


def test_command_k_columns_jsonl_and_prompts(tmp_path, tiny_model, monkeypatch):
    import mnr.evaluate

    seen = []
    real = mnr.evaluate.encode_sharded

    def spy(backbone, texts, *args):
        seen.extend(backbone.policy.texts(texts, args[-1]))  # what is tokenised: the role's prompt + text
        return real(backbone, texts, *args)

    monkeypatch.setattr(mnr.evaluate, "encode_sharded", spy)
    out = tmp_path / "mined.jsonl"
    assert main(_cli(tmp_path, tiny_model, "--output", str(out), "--num-negatives", "3", "--prompt", "query: ",
                     "--document-prompt", "passage: ")) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert list(rows[0]) == ["anchor", "positive", "negative_1", "negative_2", "negative_3"]
    assert not any(r["positive"] in (r["negative_1"], r["negative_2"], r["negative_3"]) for r in rows)
    assert all(t.startswith(("query: ", "passage: ")) for t in seen)
    assert not rows[0]["anchor"].startswith("query: ")
    examples, _ = load_examples(str(out), hard_negatives=None)  # the trainer reads the k columns as they are
    assert [len(n) for n in examples.all_negatives] == [3] * len(rows)
    assert examples.all_negatives[0] == [rows[0]["negative_1"], rows[0]["negative_2"], rows[0]["negative_3"]]


@pytest.mark.parametrize("extra, message", [(["--output", "x.txt"], "--output x.txt: unknown format"),
                                            (["--output", "x.tsv", "--num-negatives", "0"], "--num-negatives 0"),
                                            (["--output", "x.tsv", "--corpus", "missing.tsv"], "missing.tsv: no such file"),
                                            (["--output", "no/such/dir/x.tsv"], "no/such/dir is not a writable directory")])
def test_command_bad_input_is_one_line(tmp_path, tiny_model, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    assert main(_cli(tmp_path, tiny_model, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_two_processes_write_the_same_file(tmp_path, tiny_model):
    from test_distributed import MULTI_GPU, launch

    one = tmp_path / "one.tsv"
    args = _cli(tmp_path, tiny_model, "--num-negatives", "2", "--sampling", "random", "--range-max", "6")
    assert main([*args, "--output", str(one), "--batch-size", "3"]) == 0
    two = tmp_path / "two.tsv"
    launch(MULTI_GPU, ["-m", "mnr.mine", *args, "--output", str(two), "--batch-size", "3"], tmp_path)
    assert two.read_bytes() == one.read_bytes()
    summary = json.loads((tmp_path / "two.tsv.summary.json").read_text())
    assert summary["processes"] == 2


def test_exclusion_keys_never_collide_across_queries():
    from mnr.mine import _excluded_mask

    # query 0 excludes doc 7, never retrieved; with keys q * n_docs + doc and n_docs taken from the retrieved
    # indices alone (max 4), 0 * 5 + 7 would equal query 1's key 1 * 5 + 2 and wrongly exclude doc 2 for query 1
    index = torch.tensor([[0, 1, 2], [2, 3, 4]])
    mask = _excluded_mask(index, [[7, 0], [3]])
    assert mask.tolist() == [[True, False, False], [False, True, False]]
