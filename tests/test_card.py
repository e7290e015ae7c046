"""Model card: hub-indexable front matter, rounded scores, a loading snippet per library that really loads
the export and gives the trainer's embeddings."""

import re

import pytest
import torch
import yaml

from mnr.backbone import Backbone
from mnr.card import PLACEHOLDER, format_metric, model_card

INFO = {
    "base_model": "sentence-transformers/all-MiniLM-L6-v2", "license": "apache-2.0",
    "datasets": ["snli", "glue/mnli", "/data/my_pairs.tsv"], "data_stats": "9840 rows read, 3167 examples kept",
    "examples": 3167, "steps": 98,
    "settings": {"global batch size": 32, "learning rate": 2e-5, "hard negatives": True},
    "metrics": {"STSb validation": {"Spearman (cosine) x 100": {"before": 86.71631197908373, "after": 86.7012}},
                "retrieval": {"MRR@10": {"before": 0.123456, "after": 0.5, "scale": 1}}},
    "pooling": "mean", "normalize": True, "max_seq_length": 256, "embedding_dim": 384,
}


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def python_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, flags=re.DOTALL)


def test_front_matter_is_yaml_the_hub_indexes():
    meta = front_matter(model_card(INFO))
    assert meta["library_name"] == "sentence-transformers" and meta["pipeline_tag"] == "sentence-similarity"
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2" and meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["snli", "glue"]  # hub names only: the local file is named in the text
    assert "sentence-transformers" in meta["tags"]
    local = front_matter(model_card({"base_model": "/models/mine", "train_data": "embedded SNLI sample"}))
    assert "base_model" not in local and "datasets" not in local and "license" not in local


def test_scores_are_rounded_and_every_evaluator_is_shown():
    card = model_card(INFO)
    assert "| STSb validation | Spearman (cosine) x 100 | 86.72 | 86.70 |" in card
    assert "| retrieval | MRR@10 | 0.1235 | 0.5000 |" in card
    assert "86.716" not in card
    assert format_metric(None) == "-" and format_metric(0.87654, scale=1) == "0.8765"


def test_training_facts_settings_and_data_are_in_the_card():
    card = model_card(INFO)
    for text in ["- Optimizer steps: 98", "- Training examples: 3167", "9840 rows read, 3167 examples kept",
                 "/data/my_pairs.tsv", "| learning rate | 2e-05 |", "| hard negatives | yes |",
                 "normalised to unit length", "384-dimensional", "256 tokens"]:
        assert text in card, text


def test_placeholder_is_explained_and_a_real_path_replaces_it():
    card = model_card(INFO)
    assert "PATH" not in card and f"Replace `{PLACEHOLDER}`" in card
    assert f"SentenceTransformer('{PLACEHOLDER}')" in card and f"AutoModel.from_pretrained('{PLACEHOLDER}')" in card
    real = model_card({**INFO, "path": "owner/my-model"})
    assert PLACEHOLDER not in real and "SentenceTransformer('owner/my-model')" in real


def test_scores_are_rounded_and_settings_tabled():
    card = model_card({"steps": 6, "settings": {"learning rate": 2e-5}, "metrics": {"glue/stsb": {
        "Spearman (cosine) x 100": {"before": 86.71631197908373, "after": 86.70, "scale": 100}}}})
    assert "- Optimizer steps: 6" in card and "| glue/stsb | Spearman (cosine) x 100 | 86.72 | 86.70 |" in card
    assert "| learning rate | 2e-05 |" in card and "86.716" not in card


@pytest.mark.parametrize("pipeline", [{"pooling": "mean", "normalize": False}, {"pooling": "cls", "normalize": True},
                                      {"pooling": "lasttoken", "normalize": True, "prompts": ("query: ", "doc: ")},
                                      {"pooling": "mean", "normalize": True, "prompts": ("query: ", "doc: "),
                                       "include_prompt": False},
                                      {"pooling": "cls", "normalize": False, "prompts": ("represent this: ", ""),
                                       "include_prompt": False}])
def test_both_snippets_load_the_export_and_give_the_trainers_embeddings(tiny_model, tmp_path, pipeline):
    from mnr.evaluate import encode
    from mnr.model import save_model

    backbone = Backbone.load(str(tiny_model))
    encoder, tok = backbone.encoder, backbone.tokenizer
    backbone.choose(pipeline["pooling"], *pipeline.get("prompts", ("", "")), pipeline.get("include_prompt"))
    encoder.pipeline.normalize = pipeline["normalize"]
    out = tmp_path / "out"
    save_model(encoder, tok, out, 32, card={"steps": 1})
    snippets = python_blocks((out / "README.md").read_text())
    assert len(snippets) == 2
    results = []
    for code in snippets:
        scope: dict = {}
        exec(code.replace(PLACEHOLDER, str(out)), scope)  # noqa: S102 - the card's own code
        results.append(torch.as_tensor(scope["embeddings"]))
    card = (out / "README.md").read_text()
    assert f"pooling: {pipeline['pooling']}" in card and ("prompt_name=\"query\"" in card) == ("prompts" in pipeline)
    assert ("prompt's tokens left out" in card) == (pipeline.get("include_prompt") is False)
    ours = encode(backbone, scope["sentences"], max_seq_length=32, role="query")
    if pipeline["normalize"]:
        ours = torch.nn.functional.normalize(ours, dim=-1)
    for got in results:
        assert (got - ours).abs().max() < 1e-5


def test_weighted_sources_enter_the_front_matter_without_their_weight(tmp_path):
    from types import SimpleNamespace

    from mnr.checkpoint import TrainState
    from mnr.config import TrainConfig
    from mnr.objectives import objective_from_config
    from mnr.train import _card_info

    cfg = TrainConfig(train_data="snli*3, glue/mnli, /data/a.tsv*2")
    run = SimpleNamespace(cfg=cfg, objective=objective_from_config(cfg), k=0, world=1, global_batch=32,
                          negatives_per_anchor=31, state=TrainState(), data_stats="", examples=10, total_steps=1,
                          warmup_steps=1, backbone=SimpleNamespace(describe=dict))
    info = _card_info(run, tmp_path, {})
    assert info["datasets"] == ["snli", "glue/mnli", "/data/a.tsv"]
    assert front_matter(model_card(info))["datasets"] == ["snli", "glue"]
