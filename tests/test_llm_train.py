"""Decoder backbones through the CLI: a tiny Qwen2 + LoRA + GradCache + gradient checkpointing + Matryoshka trains, exports
merged weights that load in transformers and sentence-transformers with the trainer's embeddings, the adapter
alone loads in peft; EOS exactly once (truncation keeps it); left and right padding give the same embeddings."""

import json
import shutil

import pytest
import torch

pytest.importorskip("peft")

from conftest import nli_rows, train_args, write_tsv  # noqa: E402
from tiny_decoders import cached_decoder  # noqa: E402

from mnr.train import main  # noqa: E402

PROMPT = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery: "
TEXTS = ["a man is playing with a dog", "two children", "a red car is parked near the old house in the street"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm")
    base = cached_decoder("qwen2")
    train = write_tsv(root / "nli.tsv", ["premise", "hypothesis", "label"], nli_rows(12))
    out = root / "out"
    rc = main(train_args(base, train, out, "--max-steps", "3", "--lr", "1e-2", "--eval-data", "none",
                         "--lora-r", "4", "--lora-alpha", "8", "--gradient-checkpointing", "--mini-batch-size", "2",
                         "--save-adapter", "--matryoshka-dims", "32,16", "--query-prompt", PROMPT,
                         "--max-seq-length", "96",  # the prompt alone is 68 tokens: room for the texts
                         "--cache-dir", str(root / "cache")))
    assert rc == 0
    return base, out


def _last_token(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    from mnr.model import last_token_pool

    return last_token_pool(hidden, mask)


def test_lora_run_exports_merged_weights_and_the_adapter(lora_run):
    from safetensors.torch import load_file

    base, out = lora_run
    merged, before = load_file(str(out / "model.safetensors")), load_file(str(base / "model.safetensors"))
    assert set(merged) == set(before)  # the base's own key names: no peft prefixes, no adapter tensors
    assert any((merged[k] - before[k]).abs().max() > 1e-6 for k in before)  # the adapter trained
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["pooling_mode_lasttoken"] is True
    card = (out / "README.md").read_text()
    assert "merged (base + adapter)" in card and "r=4, alpha=8" in card and "non-reentrant" in card


def test_merged_export_gives_the_trainers_embeddings_in_both_libraries(lora_run):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    from mnr.backbone import Backbone
    from mnr.evaluate import encode

    _, out = lora_run
    ours = encode(Backbone.load(str(out)), TEXTS, max_seq_length=32)
    model, tok = AutoModel.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)
    batch = tok(TEXTS, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        hf = _last_token(model(**batch).last_hidden_state, batch["attention_mask"])
    st = torch.from_numpy(SentenceTransformer(str(out), device="cpu").encode(TEXTS))
    assert (ours - hf).abs().max() < 1e-5
    assert (ours - st).abs().max() < 1e-5


def test_the_adapter_alone_loads_with_peft_and_equals_the_merged_export(lora_run):
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    base, out = lora_run
    merged = AutoModel.from_pretrained(out).eval()
    adapted = PeftModel.from_pretrained(AutoModel.from_pretrained(base), str(out / "adapter")).eval()
    batch = AutoTokenizer.from_pretrained(out)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        a = merged(**batch).last_hidden_state
        b = adapted(**batch).last_hidden_state
    assert (a - b).abs().max() < 1e-4


def test_eos_exactly_once_after_truncation_in_the_store_policy_and_the_saved_tokenizer(lora_run):
    from transformers import AutoTokenizer

    from mnr.backbone import Backbone

    _, out = lora_run
    policy = Backbone.load(str(out), max_length=8).policy
    eos = policy.tokenizer.eos_token_id
    values, lengths = policy.tokenise([TEXTS[2], TEXTS[1]], "document")
    rows = torch.from_numpy(values.astype("int64")).split(lengths.tolist())
    assert lengths[0] == 8 and all(int(r[-1]) == eos and int((r == eos).sum()) == 1 for r in rows)
    saved = AutoTokenizer.from_pretrained(out)(TEXTS, truncation=True, max_length=8)["input_ids"]
    assert all(r[-1] == eos and r.count(eos) == 1 for r in saved)


@pytest.mark.parametrize("family", ["qwen2", "gpt2", "llama"])
def test_left_and_right_padding_give_the_same_embeddings(tmp_path, family):
    from mnr.backbone import Backbone
    from mnr.evaluate import encode

    right = cached_decoder(family)
    left = tmp_path / "left"
    shutil.copytree(right, left)
    config = json.loads((left / "tokenizer_config.json").read_text())
    (left / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "left"}))
    backbones = [Backbone.load(str(p), max_length=32) for p in (right, left)]
    assert [b.policy.padding_side for b in backbones] == ["right", "left"]
    for b in backbones:
        b.encoder.eval()
    with torch.no_grad():  # the trainer's encoder on the collator's padding, and the evaluators' encode
        trained = [b.embed(**b.policy.batch(TEXTS, "query")) for b in backbones]
        evaluated = [encode(b, TEXTS, max_seq_length=32, batch_size=3) for b in backbones]
    assert (trained[0] - trained[1]).abs().max() < 1e-5
    assert (evaluated[0] - evaluated[1]).abs().max() < 1e-5
    assert (trained[0] - evaluated[0]).abs().max() < 1e-5


def test_bidirectional_is_trained_and_saved_so_the_export_attends_both_ways(tmp_path):
    from mnr.backbone import Backbone

    train = write_tsv(tmp_path / "nli.tsv", ["premise", "hypothesis", "label"], nli_rows(8))
    out = tmp_path / "out"
    assert main(train_args(cached_decoder("qwen2"), train, out, "--max-steps", "1", "--eval-data", "none",
                           "--bidirectional", "--cache-dir", str(tmp_path / "cache"))) == 0
    assert json.loads((out / "config.json").read_text())["is_causal"] is False
    states = []
    for path in (cached_decoder("qwen2"), out):
        transformer = Backbone.load(str(path)).encoder.transformer.eval()
        with torch.no_grad():
            hidden = transformer(input_ids=torch.tensor([[5, 6, 7, 8], [5, 6, 7, 9]])).last_hidden_state[:, 0]
        states.append(float((hidden[0] - hidden[1]).abs().max()))
    assert states[0] == 0 and states[1] > 1e-4  # a suffix changes token 0 only when attending both ways
    assert "bidirectional" in (out / "README.md").read_text()


def test_training_starts_from_a_saved_adapter(lora_run, tmp_path):
    from safetensors.torch import load_file

    base, first = lora_run
    train = write_tsv(tmp_path / "nli.tsv", ["premise", "hypothesis", "label"], nli_rows(12))
    out = tmp_path / "out"
    assert main(train_args(base, train, out, "--max-steps", "1", "--lr", "1e-9", "--eval-data", "none",
                           "--lora-adapter", str(first / "adapter"), "--cache-dir", str(tmp_path / "cache"))) == 0
    a, b = load_file(str(first / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5  # the adapter's weights, barely moved
    assert "started from" in (out / "README.md").read_text()


def test_save_dtype_bfloat16_writes_bfloat16_weights_that_load_as_written(tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModel

    train = write_tsv(tmp_path / "nli.tsv", ["premise", "hypothesis", "label"], nli_rows(8))
    out = tmp_path / "out"
    assert main(train_args(cached_decoder("qwen2"), train, out, "--max-steps", "1", "--eval-data", "none",
                           "--lora-r", "2", "--save-dtype", "bfloat16", "--cache-dir", str(tmp_path / "cache"))) == 0
    assert {v.dtype for v in load_file(str(out / "model.safetensors")).values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert next(AutoModel.from_pretrained(out).parameters()).dtype == torch.bfloat16
    assert "export dtype" in (out / "README.md").read_text()


def test_a_decoder_without_pad_token_pads_with_eos_and_says_so(caplog):
    import logging

    from mnr.backbone import Backbone

    with caplog.at_level(logging.INFO, logger="mnr"):
        backbone = Backbone.load(str(cached_decoder("llama")), max_length=16)
    tok = backbone.tokenizer
    assert tok.pad_token == tok.eos_token == "</s>" and backbone.policy.pad_token_id == tok.eos_token_id
    assert "no pad token" in caplog.text and "ends in the EOS token" in caplog.text
    assert backbone.pipeline.pooling == "lasttoken"
    from transformers import AutoTokenizer

    from mnr.backbone import TokenPolicy

    raw = TokenPolicy.of(AutoTokenizer.from_pretrained(cached_decoder("llama")), 16)
    assert raw.fingerprint() != backbone.policy.fingerprint()  # a store built without the EOS is rebuilt
    ids = backbone.policy.batch(["a man is playing"], "query")["input_ids"][0].tolist()
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == 1


@pytest.mark.slow
def test_sigkill_then_resume_with_lora_equals_uninterrupted(tmp_path):
    """LoRA with dropout on, gradient checkpointing and GradCache: the replayed RNG gives the same adapter."""
    from conftest import load_weights, max_abs_diff
    from safetensors.torch import load_file
    from test_reliability import WORKER, _launch, _records

    base = cached_decoder("qwen2", dropout=0.1)
    train = write_tsv(tmp_path / "nli.tsv", ["premise", "hypothesis", "label"], nli_rows(40))
    common = ["--max-steps", "7", "--save-steps", "2", "--log-steps", "1", "--cache-dir", str(tmp_path / "c"),
              "--eval-data", "none", "--lr", "1e-3", "--lora-r", "4", "--lora-dropout", "0.1",
              "--gradient-checkpointing", "--mini-batch-size", "2", "--save-adapter"]
    ref, out = tmp_path / "ref", tmp_path / "run"
    done = _launch(1, [WORKER, "none", "0", "0", "--"] + train_args(base, train, ref, *common))
    assert done.returncode == 0, done.stderr[-3000:]
    killed = _launch(1, [WORKER, "sigkill", "6", "0", "--"] + train_args(base, train, out, *common))
    assert killed.returncode != 0 and not (out / "model.safetensors").exists()
    resumed = _launch(1, [WORKER, "none", "0", "0", "--"] + train_args(base, train, out, *common, "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoint-4" in resumed.stderr
    assert max_abs_diff(load_weights(ref), load_weights(out)) < 1e-5
    adapters = [load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (ref, out)]
    assert max_abs_diff(*adapters) < 1e-5
    assert _records(out) == _records(ref)


@pytest.mark.slow
@pytest.mark.parametrize("precision, bound", [("no", 1e-5), ("bf16", 0.1)])
def test_two_processes_with_lora_train_the_adapter_of_one_process_with_twice_the_batch(tmp_path, precision, bound):
    """LoRA + gathered negatives + GradCache + gradient checkpointing: 2 x B gives the adapter of 1 x 2B (bound: on
    the relative norm of the difference of the trained B matrices; bf16 rounds each batch split differently and
    AdamW's first steps move every weight by about the learning rate whatever the size of its gradient)."""
    from conftest import max_abs_diff
    from safetensors.torch import load_file
    from test_distributed import TRAIN_ARGS, launch

    base = cached_decoder("qwen2")
    data = write_tsv(tmp_path / "nli.tsv", ["premise", "hypothesis", "label"], nli_rows())
    common = ["train_mnr.py", "--model", str(base), "--train-data", str(data), *TRAIN_ARGS, "--lora-r", "4",
              "--gradient-checkpointing", "--save-adapter", "--lr", "1e-2"]
    shape = ["--num_machines", "1", "--mixed_precision", precision, "--dynamo_backend", "no"]
    launch(["--num_processes", "1", *shape],
           [*common, "--batch-size", "8", "--output-dir", str(tmp_path / "single")], tmp_path)
    launch(["--multi_gpu", "--num_processes", "2", *shape],
           [*common, "--batch-size", "4", "--mini-batch-size", "2", "--output-dir", str(tmp_path / "two")], tmp_path)
    adapters = [load_file(str(tmp_path / d / "adapter" / "adapter_model.safetensors")) for d in ("single", "two")]
    b = [torch.cat([v.flatten() for k, v in sorted(a.items()) if "lora_B" in k]) for a in adapters]
    relative = float((b[0] - b[1]).norm() / b[0].norm())
    print(f"{precision}: |B(2 x 4) - B(1 x 8)| / |B(1 x 8)| = {relative:.3g}; max |diff| {max_abs_diff(*adapters):.3g}")
    assert float(b[0].abs().max()) > 1e-2  # B starts at 0: the adapter trained
    assert relative < bound  # measured on this CPU: 3e-7 (fp32), 0.033 (bf16)
    assert precision != "no" or max_abs_diff(*adapters) < 5e-5  # fp32: test_distributed's bound (measured 1.4e-6)


def test_mine_finds_the_same_negatives_with_left_and_right_padding(tmp_path):
    from mnr.mine import main as mine

    pairs = write_tsv(tmp_path / "nli.tsv", ["premise", "hypothesis", "label"], nli_rows(12))
    right, left = cached_decoder("gpt2"), tmp_path / "left"  # absolute positions: left padding shifts them
    shutil.copytree(right, left)
    config = json.loads((left / "tokenizer_config.json").read_text())
    (left / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "left"}))
    outs = [tmp_path / f"{name}.tsv" for name in ("right", "left")]
    for model, out in zip((right, left), outs):
        assert mine([str(pairs), "--model", str(model), "--max-seq-length", "32", "--batch-size", "5",
                     "--num-negatives", "2", "--output", str(out)]) == 0
    assert outs[0].read_text() == outs[1].read_text()
