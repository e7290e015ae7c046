"""include_prompt: false (sentence-transformers' Pooling convention, Instructor / NV-Embed style): the prompt's
tokens go through the transformer but are left out of the pooling, in training (plain and GradCache, per-source
prompts), in the evaluators and `mnr.mine`, and in the export, which sentence-transformers then reads to the
trainer's embeddings."""

import json

import numpy as np
import pytest
import torch
from conftest import load_weights, max_abs_diff, token_texts, train_args
from tiny_decoders import cached_decoder

from mnr.backbone import Backbone
from mnr.batching import Collator
from mnr.evaluate import encode
from mnr.model import without_prompt
from mnr.train import main

TEXTS = ["a man is playing with a dog", "two children", "a red car is parked near the old house"]
PROMPTS = ("query: ", "passage: ")


def test_the_pooling_mask_leaves_out_the_prompt_as_sentence_transformers_does_on_either_side():
    from sentence_transformers.sentence_transformer.modules.pooling import Pooling

    right = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]])
    for mask in (right, left):
        ours = without_prompt(mask, torch.tensor([2, 2]))
        assert torch.equal(ours, Pooling._exclude_prompt_from_mask(mask, 2))
        assert ours.sum(dim=1).tolist() == [3, 1] and torch.equal(mask, right if mask is right else left)
    assert without_prompt(right, None) is right
    assert without_prompt(right, torch.tensor([1, 3])).tolist() == [[0, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0]]


@pytest.mark.parametrize("kind", ["bert", "qwen2"])
def test_the_prompt_length_is_sentence_transformers_own(tiny_model, kind, tmp_path):
    from sentence_transformers import SentenceTransformer

    from mnr.model import save_model

    path = tiny_model if kind == "bert" else cached_decoder("qwen2")
    backbone = Backbone.load(str(path), 32, query_prompt="Instruct: find the answer\nQuery: ")
    save_model(backbone.encoder, backbone.tokenizer, tmp_path / "m", 32)
    theirs = SentenceTransformer(str(tmp_path / "m"), device="cpu")[0]
    for prompt in ("Instruct: find the answer\nQuery: ", "query: ", "x"):
        assert backbone.policy.prompt_length(prompt) == theirs._get_prompt_length(prompt) > 0
    assert backbone.policy.prompt_length("") == 0


def test_the_collator_gives_each_row_its_sources_prompt_length_empty_slots_left_out():
    tokens = token_texts([[5, 6, 7, 8], [5, 9], [5, 6, 9, 9, 9], [5, 7], [5, 8, 8], [5, 6]])
    rows = np.array([[0, 1, 2], [3, 4, -1], [1, 5, 0]], dtype=np.int32)  # example 1 has no negative: an empty slot
    collator = Collator(tokens, rows, 0, 1, masked=True, left_out=[[3, 2], [1, 4]], sources=np.array([0, 1, 0]))
    batch = collator(np.arange(3))
    assert batch["prompt_lengths"].tolist() == [3, 1, 3] + [2, 4, 2] + [2, 2]  # anchors, positives, negatives
    assert batch["input_ids"].shape[0] == 8 and "row_index" in batch  # example 1's empty slot not embedded
    assert batch["input_ids"][6:, :3].tolist() == [[5, 6, 9], [5, 6, 7]]  # the negatives of examples 0 and 2
    assert "prompt_lengths" not in Collator(tokens, rows, 0, 1)(np.arange(3))


def _run(model, data, out, *extra):
    assert main(train_args(model, data, out, "--max-steps", "3", "--eval-data", "none", "--lr", "1e-3",
                           "--query-prompt", PROMPTS[0], "--document-prompt", PROMPTS[1], *extra)) == 0
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model):
    from conftest import nli_rows, write_tsv

    root = tmp_path_factory.mktemp("include-prompt")
    model = tiny_model  # dropout off: GradCache's chunks and the length buckets draw no other dropout masks
    data = write_tsv(root / "nli.tsv", ["premise", "hypothesis", "label"], nli_rows(12))
    cache = ["--cache-dir", str(root / "cache")]
    return model, {
        "plain": _run(model, data, root / "plain", "--no-include-prompt", *cache),
        "gradcache": _run(model, data, root / "gradcache", "--no-include-prompt", "--mini-batch-size", "3", *cache),
        "buckets": _run(model, data, root / "buckets", "--no-include-prompt", "--length-buckets", "2",
                        "--batch-size", "8", *cache),
        "buckets_ref": _run(model, data, root / "buckets_ref", "--no-include-prompt", "--length-buckets", "1",
                            "--batch-size", "8", *cache),
        "included": _run(model, data, root / "included", *cache),
    }


def test_gradcache_and_length_buckets_train_the_same_weights_without_the_prompt(runs):
    _, out = runs
    assert max_abs_diff(load_weights(out["plain"]), load_weights(out["gradcache"])) < 1e-5
    assert max_abs_diff(load_weights(out["buckets"]), load_weights(out["buckets_ref"])) < 1e-5
    assert max_abs_diff(load_weights(out["plain"]), load_weights(out["included"])) > 1e-4  # the pooling differed


def test_the_export_leaves_the_prompt_out_and_sentence_transformers_reads_it_so(runs):
    from sentence_transformers import SentenceTransformer

    _, out = runs
    path = out["plain"]
    assert json.loads((path / "1_Pooling" / "config.json").read_text())["include_prompt"] is False
    assert "prompt's tokens left out" in (path / "README.md").read_text()
    identity = json.loads((path / "mnr_run.json").read_text())["run_identity"]
    assert identity["include_prompt"] is False
    assert json.loads((out["included"] / "mnr_run.json").read_text())["run_identity"]["include_prompt"] is None
    backbone = Backbone.load(str(path))
    assert backbone.pipeline.include_prompt is False and backbone.policy.include_prompt is False
    st = SentenceTransformer(str(path), device="cpu")
    for role, name in (("query", "query"), ("document", "document")):
        ours = encode(backbone, TEXTS, max_seq_length=32, role=role)
        theirs = torch.from_numpy(st.encode(TEXTS, prompt_name=name))
        assert (ours - theirs).abs().max() < 1e-5
    included = encode(Backbone.load(str(path), include_prompt=True), TEXTS, max_seq_length=32, role="query")
    assert (included - encode(backbone, TEXTS, max_seq_length=32, role="query")).abs().max() > 1e-3


def test_training_pools_each_role_without_its_prompt(runs, tmp_path, monkeypatch):
    import mnr.model
    from conftest import nli_rows, write_tsv

    model, _ = runs
    seen = []
    real = mnr.model.without_prompt

    def spy(mask, prompt_lengths):
        seen.append(None if prompt_lengths is None else prompt_lengths.tolist())
        return real(mask, prompt_lengths)

    monkeypatch.setattr(mnr.model, "without_prompt", spy)
    data = write_tsv(tmp_path / "nli.tsv", ["premise", "hypothesis", "label"], nli_rows(12))
    _run(model, data, tmp_path / "out", "--no-include-prompt", "--max-steps", "1", "--no-hard-negatives",
         "--length-buckets", "1")
    policy = Backbone.load(str(model), 32, query_prompt=PROMPTS[0]).policy
    query, document = (policy.prompt_length(p) for p in PROMPTS)
    step = seen[0]  # the training forward (one, not bucketed)
    assert step == [query] * 4 + [document] * 4 and query != document  # anchors, then positives


def test_a_resume_that_switches_include_prompt_is_refused(tiny_model, tmp_path):
    from mnr.checkpoint import identity_changes, run_identity
    from mnr.config import parse_config

    def identity(*flags):
        return run_identity(parse_config(["--model", str(tiny_model), *flags]), 1, str(tiny_model), "", "")

    assert identity_changes(identity(), identity("--no-include-prompt")) == ["include_prompt: None -> False"]
    assert identity_changes(identity(), identity("--include-prompt")) == []  # the base's own: the same run


def test_the_evaluators_and_mnr_evaluate_score_what_sentence_transformers_scores(runs, sts_file, capsys):
    from scipy.stats import spearmanr
    from sentence_transformers import SentenceTransformer

    from mnr.evaluate import build_evaluators
    from mnr.evaluate import main as evaluate

    _, out = runs
    path = out["plain"]
    (sts,) = build_evaluators(str(sts_file), max_seq_length=32)
    ours = sts.scores(Backbone.load(str(path)))[f"{sts.name}/spearman"]
    st = SentenceTransformer(str(path), device="cpu")
    a, b = (st.encode(texts, prompt_name="query", normalize_embeddings=True)
            for texts in (sts.data.sentences1, sts.data.sentences2))
    assert ours == pytest.approx(100 * spearmanr((a * b).sum(axis=1), sts.data.scores).statistic, abs=1e-4)
    included = sts.scores(Backbone.load(str(path), include_prompt=True))[f"{sts.name}/spearman"]
    assert included != pytest.approx(ours, abs=1e-3)  # the prompt's tokens matter here
    for flags, want, include in (([], ours, False), (["--include-prompt"], included, True)):
        capsys.readouterr()
        assert evaluate([str(path), "--data", str(sts_file), "--max-seq-length", "32", "--json", *flags]) == 0
        printed = json.loads(capsys.readouterr().out)
        (result,) = printed["results"].values()
        assert printed["include_prompt"] is include and result["spearman"] == pytest.approx(want, abs=1e-6)


def test_a_prompt_that_fills_max_seq_length_is_refused_in_one_line(tiny_model, nli_file, tmp_path, capsys):
    """Every text would be cut to the prompt alone: the same embedding for all, or, with the prompt left out of
    the pooling, none.  Train, mnr.evaluate and mnr.mine refuse it, naming the prompt and the length."""
    from mnr.evaluate import main as evaluate
    from mnr.mine import main as mine

    long = "represent this sentence for searching relevant passages in a very large collection: "
    rc = main(train_args(tiny_model, nli_file, tmp_path / "out", "--max-seq-length", "8", "--query-prompt", long,
                         "--eval-data", "none", "--cache-dir", str(tmp_path / "cache")))
    err = capsys.readouterr().err
    assert rc == 2 and "the query prompt 'represent this sentence for searching...' is" in err
    assert "max_seq_length 8 leaves no room for the text" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "model.safetensors").exists()
    assert evaluate([str(tiny_model), "--max-seq-length", "8", "--document-prompt", long]) == 2
    assert "the document prompt" in capsys.readouterr().err
    assert mine([str(nli_file), "--model", str(tiny_model), "--max-seq-length", "8", "--query-prompt", long,
                 "--output", str(tmp_path / "m.tsv")]) == 2
    assert "--max-seq-length 8 leaves no room" in capsys.readouterr().err
    # a prompt that leaves room trains
    assert main(train_args(tiny_model, nli_file, tmp_path / "ok", "--max-steps", "1", "--query-prompt", "q: ",
                           "--eval-data", "none", "--cache-dir", str(tmp_path / "cache"))) == 0
