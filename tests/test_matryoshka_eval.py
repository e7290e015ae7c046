"""Matryoshka outside the loss (mnr/matryoshka.py): per-size evaluation (--eval-dims), the sizes recorded in the
export and shown in the card, and the `mnr.evaluate` table; on the tiny random model (32 dimensions)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from conftest import train_args
from mnr.backbone import Backbone
from mnr.evaluate import build_evaluators, encode, metric_choices
from mnr.config import DimsError, parse_dims
from mnr.matryoshka import trained_dims, truncated_dims


def test_each_size_is_scored_on_truncated_renormalised_embeddings(tiny_model, sts_file):
    from mnr.evaluate import _spearman_of

    backbone = Backbone.load(str(tiny_model))
    (ev,) = build_evaluators(str(sts_file), 32, dims=(16, 8))
    by_dim = ev.by_dim(backbone)
    assert list(by_dim) == [None, 16, 8]
    assert by_dim[None] == replace(ev, dims=()).by_dim(backbone)[None]  # the full size: the numbers without --eval-dims
    texts = list(dict.fromkeys(ev.data.sentences1 + ev.data.sentences2))
    emb = encode(backbone, texts, 32)
    expected = _spearman_of(texts, F.normalize(emb[:, :8], dim=-1), ev.data)
    assert by_dim[8]["spearman"] == pytest.approx(expected, abs=1e-9)
    assert by_dim[8] != by_dim[None]
    assert set(ev.scores(backbone)) == {"sts/spearman", "sts@16/spearman", "sts@8/spearman"}
    assert metric_choices([ev]) == ["sts/spearman", "sts@16/spearman", "sts@8/spearman"]


def test_retrieval_metrics_per_size(tiny_model, nli_file):
    backbone = Backbone.load(str(tiny_model))
    (ev,) = build_evaluators(str(nli_file), 32, dims=(4,))
    scores = ev.scores(backbone)
    assert "nli@4/ndcg@10" in scores and "nli/ndcg@10" in scores
    assert metric_choices([ev])[metric_choices([ev]).index("nli@4/ndcg@10") - 1] == "nli/accuracy@1"


def test_dims_parsing_and_width():
    assert parse_dims("384, 128,32") == (384, 128, 32)
    assert truncated_dims((384, 128, 32), 384) == (128, 32)
    for bad in ("384,x", "0", "128,128"):
        with pytest.raises(DimsError, match=repr(bad)):
            parse_dims(bad)
    with pytest.raises(DimsError, match="512 exceeds the model's 384"):
        truncated_dims((512,), 384)


def test_training_logs_each_size_records_them_and_the_card_shows_truncate_dim(tmp_path, tiny_model, nli_file,
                                                                               sts_file, cache_dir, capsys):
    from mnr.evaluate import main as evaluate_main
    from mnr.train import main

    out = tmp_path / "run"
    assert main(train_args(tiny_model, nli_file, out, "--max-steps", "2", "--eval-data", str(sts_file),
                           "--matryoshka-dims", "32,16", "--eval-steps", "1",
                           "--metric-for-best", "sts@16/spearman")) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "sts/spearman" in r]
    assert evals and all("sts@16/spearman" in r for r in evals)
    assert not any("sts@32/spearman" in r for r in evals)  # 32 is the full size: the plain key
    assert trained_dims(out) == (32, 16)
    assert json.loads((out / "config_sentence_transformers.json").read_text())["mnr_matryoshka_dims"] == [32, 16]
    card = (out / "README.md").read_text()
    assert "truncate_dim=16" in card and "| sts@16 | spearman |" in card
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(out), truncate_dim=16, device="cpu")  # the card's snippet, on this export
    backbone = Backbone.load(str(out))
    ours = encode(backbone, ["a man is playing"], 32)
    assert torch.allclose(torch.as_tensor(st.encode(["a man is playing"])), ours[:, :16], atol=1e-5)
    capsys.readouterr()
    # mnr.evaluate: the recorded sizes by default, --eval-dims to choose
    assert evaluate_main([str(out), "--data", str(sts_file), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert set(results) == {"sts", "sts@16"} and results["sts@16"]["dim"] == 16
    assert evaluate_main([str(out), "--data", str(sts_file), "--eval-dims", "8"]) == 0
    table = capsys.readouterr().out
    assert " 8 " in table and "full" in table


def test_eval_dims_without_matryoshka_and_bad_values_are_one_line(tmp_path, tiny_model, nli_file, sts_file,
                                                                   cache_dir, capsys):
    from mnr.evaluate import main as evaluate_main
    from mnr.train import main

    assert evaluate_main([str(tiny_model), "--data", str(sts_file), "--eval-dims", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --eval-dims 64: 64 exceeds the model's 32 dimensions"
    assert evaluate_main([str(tiny_model), "--data", str(sts_file), "--eval-dims", "a"]) == 2
    assert "--eval-dims 'a'" in capsys.readouterr().err
    assert main(train_args(tiny_model, nli_file, tmp_path / "bad", "--max-steps", "1", "--eval-data", str(sts_file),
                           "--eval-dims", "64")) == 2
    assert "eval_dims='64' is invalid" in capsys.readouterr().err
    assert main(train_args(tiny_model, nli_file, tmp_path / "bad2", "--eval-dims", "8,x")) == 2
    assert "eval_dims='8,x' is invalid" in capsys.readouterr().err
    out = tmp_path / "plain"
    assert main(train_args(tiny_model, nli_file, out, "--max-steps", "1", "--eval-data", str(sts_file),
                           "--eval-dims", "8", "--metric-for-best", "sts@8")) == 0
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert "sts@8/spearman" in last and trained_dims(out) == ()
    assert "truncate_dim" not in (out / "README.md").read_text()


@pytest.mark.slow
def test_two_processes_give_the_single_process_numbers_at_every_size(tmp_path, tiny_model, sts_file, nli_file):
    from test_distributed import MULTI_GPU, launch

    from mnr.evaluate import main as evaluate_main

    args = [str(tiny_model), "--data", f"{sts_file},{nli_file}", "--eval-dims", "16,8", "--json",
            "--max-seq-length", "32", "--batch-size", "4"]
    proc = launch(MULTI_GPU, ["-m", "mnr.evaluate", *args], tmp_path)
    two = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert two["processes"] == 2
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert evaluate_main(args) == 0
    one = json.loads(buffer.getvalue())
    assert set(one["results"]) == set(two["results"]) == {"sts", "sts@16", "sts@8", "nli", "nli@16", "nli@8"}
    for name, res in one["results"].items():
        for metric, value in res.items():
            if isinstance(value, float):
                assert abs(value - two["results"][name][metric]) < 1e-6, (name, metric)
