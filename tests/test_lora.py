"""mnr.lora: only the adapter trains; the merged export loads without peft (AutoModel, SentenceTransformer) and
gives the adapter model's embeddings; the adapter alone loads with peft and sentence-transformers."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("peft")

from conftest import build_tiny_model
from mnr.decoder import ensure_pad_token
from mnr.lora import (LoraError, LoraSettings, apply_lora, base_module, load_adapter, merged_state_dict,
                      save_adapter, save_transformer, trainable_line, trainable_parameters)
from mnr.model import Encoder, POOLINGS, load_encoder, save_model
from tiny_decoders import cached_decoder

TEXTS = ["a man is playing with the dog near the house", "two women sleep", "the child runs outside"]


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("lora-bert") / "m")


def nudge_adapter(model, seed=0):
    """B = 0 at the start (the adapter changes nothing): give A and B random values, as training would."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.2)


def adapted(path, pooling, settings=LoraSettings(r=4, alpha=8)):
    """(encoder with a nudged adapter, tokenizer, base path) from a tiny model folder."""
    encoder, tokenizer = load_encoder(str(path))
    ensure_pad_token(tokenizer)
    encoder.pipeline.pooling = pooling
    encoder.transformer = apply_lora(encoder.transformer, settings)
    nudge_adapter(encoder.transformer)
    return encoder.eval(), tokenizer


def embed(encoder, tokenizer, texts=TEXTS):
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return encoder(enc["input_ids"], enc["attention_mask"])


def test_settings_are_validated():
    assert LoraSettings(target_modules="q_proj, v_proj").target_modules == ("q_proj", "v_proj")
    assert LoraSettings().target_modules == "all-linear"
    for bad, match in [({"r": 0}, "lora_r=0"), ({"alpha": 0}, "lora_alpha=0"), ({"dropout": 1.0}, "lora_dropout=1.0"),
                       ({"target_modules": " , "}, "names no module")]:
        with pytest.raises(LoraError, match=match):
            LoraSettings(**bad)


def test_only_the_adapter_trains(bert_path):
    encoder, _ = load_encoder(str(bert_path))
    total_before = sum(p.numel() for p in encoder.transformer.parameters())
    model = apply_lora(encoder.transformer, LoraSettings(r=4, alpha=8))
    trainable, total = trainable_parameters(model)
    assert 0 < trainable < total and total > total_before
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    assert trainable_line(model) == f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"
    with pytest.raises(LoraError, match="lora_target_modules='nope'"):
        apply_lora(load_encoder(str(bert_path))[0].transformer, LoraSettings(target_modules="nope"))


def test_merged_weights_do_not_change_the_training_model(bert_path):
    encoder, tokenizer = adapted(bert_path, "mean")
    before = {k: v.clone() for k, v in encoder.transformer.state_dict().items()}
    emb = embed(encoder, tokenizer)
    merged_state_dict(encoder.transformer)
    assert all(torch.equal(before[k], v) for k, v in encoder.transformer.state_dict().items())
    assert torch.equal(embed(encoder, tokenizer), emb)


@pytest.mark.parametrize("kind", ["bert", "qwen2"])
def test_merged_export_gives_the_adapter_embeddings_without_peft(bert_path, kind, tmp_path):
    """The export: the base's key names (a strict load into a fresh base), read by AutoModel and by
    SentenceTransformer(path) to the trainer's embeddings within 1e-5."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    path, pooling = (bert_path, "mean") if kind == "bert" else (cached_decoder("qwen2"), "lasttoken")
    encoder, tokenizer = adapted(path, pooling)
    trained = embed(encoder, tokenizer)
    merged = merged_state_dict(encoder.transformer)
    export, _ = load_encoder(str(path))  # a fresh base: the export is its weights, loaded strictly
    export.pipeline.pooling = pooling
    assert float((embed(export.eval(), tokenizer) - trained).abs().max()) > 1e-2  # the adapter matters
    export.transformer.load_state_dict(merged, strict=True)
    out = tmp_path / "export"
    save_model(export, tokenizer, out)
    assert not (out / "adapter_config.json").exists()

    plain = AutoModel.from_pretrained(out).eval()
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = plain(**{k: enc[k] for k in ("input_ids", "attention_mask")}).last_hidden_state
    assert float((POOLINGS[pooling](hidden, enc["attention_mask"]) - trained).abs().max()) < 1e-5
    st = SentenceTransformer(str(out), device="cpu")
    assert float((st.encode(TEXTS, convert_to_tensor=True) - trained).abs().max()) < 1e-5


def test_the_base_saves_the_merged_weights_under_its_own_names(tmp_path):
    """save_pretrained of the base module with the merged state (no second copy of the model): AutoModel
    loads it with no missing or unexpected key."""
    from transformers import AutoModel

    encoder, tokenizer = adapted(cached_decoder("qwen2"), "lasttoken")
    trained = embed(encoder, tokenizer)
    base_module(encoder.transformer).save_pretrained(tmp_path, state_dict=merged_state_dict(encoder.transformer))
    plain, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info
    encoder.transformer = plain
    assert float((embed(encoder.eval(), tokenizer) - trained).abs().max()) < 1e-5


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_save_transformer_writes_the_merged_weights_in_the_asked_dtype(dtype, tmp_path):
    from transformers import AutoModel

    encoder, tokenizer = adapted(cached_decoder("qwen2"), "lasttoken")
    trained = embed(encoder, tokenizer)
    save_transformer(encoder.transformer, tmp_path, dtype)
    plain = AutoModel.from_pretrained(tmp_path)
    assert next(plain.parameters()).dtype == (torch.bfloat16 if dtype else torch.float32)
    assert {p.dtype for p in encoder.transformer.parameters()} == {torch.float32}  # the training model is untouched
    encoder.transformer = plain.float()
    assert float((embed(encoder.eval(), tokenizer) - trained).abs().max()) < (5e-2 if dtype else 1e-5)


@pytest.mark.parametrize("kind", ["bert", "qwen2"])
def test_the_adapter_alone_loads_with_peft_and_sentence_transformers(bert_path, kind, tmp_path):
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    path, pooling = (bert_path, "mean") if kind == "bert" else (cached_decoder("qwen2"), "lasttoken")
    encoder, tokenizer = adapted(path, pooling)
    trained = embed(encoder, tokenizer)
    save_adapter(encoder.transformer, tmp_path / "adapter", base_model=str(path))
    assert {p.name for p in (tmp_path / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(path)

    reloaded = PeftModel.from_pretrained(AutoModel.from_pretrained(path), str(tmp_path / "adapter"))
    assert float((embed(Encoder(reloaded, pipeline=encoder.pipeline).eval(), tokenizer) - trained).abs().max()) < 1e-5

    export, _ = load_encoder(str(path))
    export.pipeline.pooling = pooling
    save_model(export, tokenizer, tmp_path / "base")  # the base in sentence-transformers layout, pooling included
    st = SentenceTransformer(str(tmp_path / "base"), device="cpu")
    st.load_adapter(str(tmp_path / "adapter"))
    assert float((st.encode(TEXTS, convert_to_tensor=True) - trained).abs().max()) < 1e-5


def test_training_starts_from_a_saved_adapter(bert_path, tmp_path):
    encoder, tokenizer = adapted(bert_path, "mean")
    trained = embed(encoder, tokenizer)
    save_adapter(encoder.transformer, tmp_path / "adapter")
    again, _ = load_encoder(str(bert_path))
    again.transformer = load_adapter(again.transformer, tmp_path / "adapter")
    assert float((embed(again.eval(), tokenizer) - trained).abs().max()) < 1e-6
    assert all(("lora_" in n) == p.requires_grad for n, p in again.transformer.named_parameters())
    frozen = load_adapter(load_encoder(str(bert_path))[0].transformer, tmp_path / "adapter", trainable=False)
    assert trainable_parameters(frozen)[0] == 0
    with pytest.raises(LoraError, match="not an adapter folder"):
        load_adapter(again.transformer, tmp_path)


@pytest.mark.parametrize("kind", ["bert", "qwen2"])
def test_fsdp_export_merges_the_gathered_state_as_the_whole_model_does(bert_path, kind):
    """A sharded model's export has only the gathered full state dict (peft's keys) to merge from:
    merge_gathered of it equals merged_state_dict of the whole model."""
    from mnr.lora import merge_gathered

    encoder, _ = adapted(bert_path if kind == "bert" else cached_decoder("qwen2"), "mean")
    gathered = {k: v.detach().clone() for k, v in encoder.transformer.state_dict().items()}
    want = merged_state_dict(encoder.transformer)
    got = merge_gathered(encoder.transformer, gathered)
    assert set(got) == set(want) and not any(".lora_" in k or "base_model" in k for k in got)
    assert max((got[k].float() - want[k].float()).abs().max().item() for k in want) < 1e-6
    changed = [k for k in want if k.endswith(".weight") and f"base_model.model.{k[:-7]}.base_layer.weight" in gathered]
    assert changed and all(not torch.equal(got[k], gathered[f"base_model.model.{k[:-7]}.base_layer.weight"])
                           for k in changed)


def test_the_backbone_adapts_and_describes_what_the_card_says(bert_path, tmp_path):
    from mnr.backbone import Backbone

    backbone = Backbone.load(str(bert_path), 32)
    line = backbone.adapt(LoraSettings(r=4, alpha=8), gradient_checkpointing=True)
    assert line == f"LoRA {LoraSettings(r=4, alpha=8).describe()}: {trainable_line(backbone.encoder)}"
    backbone.save_adapter, backbone.save_dtype = True, "bfloat16"
    rows = backbone.describe()
    assert rows.pop("LoRA adapter").startswith("r=4, alpha=8, dropout=0.0, target_modules=encoder.layer.0.")
    assert rows == {"weights": "merged (base + adapter); the adapter alone in adapter/",
                    "gradient checkpointing": "non-reentrant", "export dtype": "bfloat16"}
    backbone.export(tmp_path / "out")
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    again = Backbone.load(str(bert_path), 32)
    assert again.adapt(adapter_dir=str(tmp_path / "out" / "adapter")).startswith(f"LoRA from {tmp_path}")
    assert again.describe()["LoRA adapter"].endswith(f", started from {tmp_path / 'out' / 'adapter'}")
    assert Backbone.load(str(bert_path), 32).adapt() == "" and Backbone.load(str(bert_path), 32).describe() == {}


def test_only_the_main_process_builds_the_merged_and_cast_export(bert_path, tmp_path, monkeypatch):
    """Whole (unsharded) parameters: the other processes take part in the export but build no merged or cast
    copy of the weights; a failure to build it on the main process is raised on every process."""
    import mnr.decoder
    import mnr.lora
    from conftest import ThreadTeam
    from mnr.backbone import Backbone
    from test_collective import fake_world

    backbone = Backbone.load(str(bert_path), 32)
    backbone.adapt(LoraSettings(r=4, alpha=8))
    backbone.save_dtype = "bfloat16"
    team, built = ThreadTeam(2, timeout=20), []
    fake_world(monkeypatch, team)
    for module, name in [(mnr.lora, "merged_state_dict"), (mnr.decoder, "cast_state_dict")]:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, name=name: built.append((team.local.rank, name))
                            or real(*a))
    assert team.run(lambda r: backbone.export(tmp_path / f"rank{r}")) == [None, None]
    assert sorted(built) == [(0, "cast_state_dict"), (0, "merged_state_dict")]
    assert (tmp_path / "rank0" / "model.safetensors").is_file() and not (tmp_path / "rank1").exists()

    def broken(model):
        raise LoraError("merge failed")

    monkeypatch.setattr(mnr.lora, "merged_state_dict", broken)
    errors = team.run(lambda r: backbone.export(tmp_path / f"again{r}"))
    assert [type(e) for e in errors] == [LoraError, LoraError] and not (tmp_path / "again0").exists()


def test_a_sharded_export_that_fails_to_merge_on_the_main_process_fails_on_every_process(bert_path, tmp_path,
                                                                                        monkeypatch):
    """Sharded parameters: the main process merges the gathered state alone; its failure must not leave the
    others waiting in the export's collective."""
    import mnr.lora
    import mnr.sharding
    from conftest import ThreadTeam
    from mnr.backbone import Backbone
    from test_collective import fake_world

    backbone = Backbone.load(str(bert_path), 32)
    backbone.adapt(LoraSettings(r=4, alpha=8))
    team = ThreadTeam(2, timeout=20)
    fake_world(monkeypatch, team)
    full = {f"transformer.{k}": v for k, v in backbone.encoder.transformer.state_dict().items()}
    monkeypatch.setattr(mnr.sharding, "is_sharded", lambda module: True)
    monkeypatch.setattr(mnr.sharding, "full_state_dict", lambda module: full if team.local.rank == 0 else {})

    def broken(model, state):
        raise LoraError("merge failed")

    monkeypatch.setattr(mnr.lora, "merge_gathered", broken)
    errors = team.run(lambda r: backbone.export(tmp_path / f"rank{r}"))
    assert [type(e) for e in errors] == [LoraError, LoraError] and not (tmp_path / "rank0").exists()
