"""mnr.decoder on tiny random decoders: EOS exactly once, the pad token, either padding side gives the same
embeddings, bidirectional attention (saved with the model), float32 similarities under bf16 autocast."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig

from mnr.decoder import (append_eos, append_eos_batch, as_float32, cast_state_dict, default_pooling,
                         ensure_pad_token, float32_math, is_decoder, make_tokenizer_append_eos, pad_batch,
                         position_ids, set_bidirectional, tokenizer_appends_eos)
from mnr.loss import mnr_loss
from mnr.model import last_token_pool, mean_pool, trim_padding
from tiny_decoders import cached_decoder

TEXTS = ["a man is playing with the dog near the house", "two women sleep", "the child runs",
         "a red car is parked on the street outside the old house near the tree"]


@pytest.fixture(scope="module")
def decoders():
    return {f: cached_decoder(f) for f in ("qwen2", "qwen2_eos", "llama", "gemma", "gpt2")}


def load(path):
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


def test_decoders_are_told_from_encoders(decoders):
    for family in ("qwen2", "llama", "gemma"):
        config = AutoConfig.from_pretrained(decoders[family])
        assert is_decoder(config) and default_pooling(config) == "lasttoken"
    assert not is_decoder(BertConfig()) and default_pooling(BertConfig()) == "mean"
    assert not is_decoder(BertConfig(architectures=["BertForMaskedLM"]))
    assert is_decoder(BertConfig(is_decoder=True))  # a BERT trained as a causal LM
    other = AutoConfig.for_model("qwen2")
    other.model_type, other.architectures = "someday", ["SomedayForCausalLM"]
    assert is_decoder(other)
    bidirectional = AutoConfig.from_pretrained(decoders["qwen2"])
    bidirectional.is_causal = False
    assert is_decoder(bidirectional) and default_pooling(bidirectional) == "mean"  # as sentence-transformers


def test_eos_is_appended_exactly_once_and_truncation_keeps_it():
    eos, bos = 9, 1
    assert append_eos([5, 6], eos) == [5, 6, 9]
    assert append_eos([5, 6, 9], eos) == [5, 6, 9]  # the tokenizer added it already
    assert append_eos([5, 6, 7, 8], eos, max_len=3) == [5, 6, 9]  # the text is cut, not the EOS
    assert append_eos([5, 6, 7, 9], eos, max_len=3) == [5, 6, 9]
    assert append_eos([5, 6, 7, 8], eos, max_len=3, side="left") == [7, 8, 9]
    assert append_eos([1, 5, 6, 7], eos, max_len=3, bos_id=bos) == [1, 5, 9]  # nor the BOS
    assert append_eos([1, 5, 6, 7], eos, max_len=3, side="left", bos_id=bos) == [1, 7, 9]
    assert append_eos([], eos, max_len=1) == [9]
    assert append_eos_batch([[5], [5, 9], [5, 6, 7]], eos, max_len=2) == [[5, 9], [5, 9], [5, 9]]
    with pytest.raises(ValueError, match="max_len=1"):
        append_eos([1, 5], eos, max_len=1, bos_id=bos)
    with pytest.raises(ValueError, match="side='middle'"):
        append_eos([5], eos, side="middle")


def test_eos_once_whether_or_not_the_tokenizer_adds_it(decoders):
    """qwen2_eos's post-processor appends <|endoftext|> itself, qwen2's does not: after append_eos both rows end
    in exactly one EOS, and with the tokenizer's own truncation too."""
    for family in ("qwen2", "qwen2_eos", "llama"):
        tokenizer = AutoTokenizer.from_pretrained(decoders[family])
        eos = tokenizer.eos_token_id
        for max_len in (None, 6):
            enc = tokenizer(TEXTS, truncation=max_len is not None, max_length=max_len)["input_ids"]
            rows = append_eos_batch(enc, eos, max_len, bos_id=tokenizer.bos_token_id)
            for text, row in zip(TEXTS, rows):
                assert row[-1] == eos and row.count(eos) == 1, (family, row)
                assert max_len is None or len(row) <= max_len
                if tokenizer.bos_token_id is not None:
                    assert row[0] == tokenizer.bos_token_id
                if max_len is None:  # nothing of the text is lost
                    assert tokenizer.decode(row, skip_special_tokens=True) == text


@pytest.mark.parametrize("family", ["qwen2", "qwen2_eos", "llama", "gpt2"])
def test_a_saved_tokenizer_appends_the_eos_as_training_does(decoders, family, tmp_path):
    """After make_tokenizer_append_eos, the tokenizer itself (saved and reloaded: what an export's users get)
    encodes every text as append_eos does, its own truncation keeping the EOS."""
    tokenizer = AutoTokenizer.from_pretrained(decoders[family])
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    before = {n: tokenizer(TEXTS, truncation=n is not None, max_length=n)["input_ids"] for n in (None, 6)}
    assert make_tokenizer_append_eos(tokenizer) == (family != "qwen2_eos")
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer_appends_eos(reloaded) and not make_tokenizer_append_eos(reloaded)
    for n, rows in before.items():
        expected = append_eos_batch(rows if n is None else before[None], eos, n, bos_id=bos)
        assert reloaded(TEXTS, truncation=n is not None, max_length=n)["input_ids"] == expected


def test_a_tokenizer_without_pad_token_pads_with_eos(decoders):
    tokenizer = AutoTokenizer.from_pretrained(decoders["llama"])
    assert tokenizer.pad_token is None
    line = ensure_pad_token(tokenizer)
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>" and "'</s>'" in line
    assert ensure_pad_token(tokenizer) is None
    assert ensure_pad_token(AutoTokenizer.from_pretrained(decoders["qwen2"])) is None  # has <|endoftext|>
    tokenizer.pad_token, tokenizer.eos_token = None, None
    with pytest.raises(ValueError, match="neither a pad nor an EOS"):
        ensure_pad_token(tokenizer)


def test_pad_batch_counts_positions_from_the_first_real_token():
    ids, mask, pos = pad_batch([[5, 6, 7], [8]], pad_id=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]
    ids, mask, pos = pad_batch([[5, 6, 7], [8]], pad_id=0, side="right", width=4)
    assert ids.tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]] and pos.tolist() == [[0, 1, 2, 0], [0, 0, 0, 0]]
    assert torch.equal(position_ids(mask), pos)
    with pytest.raises(ValueError, match="width=2"):
        pad_batch([[5, 6, 7]], 0, width=2)


def test_trim_padding_drops_padding_at_either_end():
    ids, mask, pos = pad_batch([[5, 6], [8]], pad_id=0, side="left", width=5)
    t_ids, t_mask, t_pos = trim_padding(ids, mask, positions=pos)
    assert t_ids.tolist() == [[5, 6], [0, 8]] and t_pos.tolist() == [[0, 1], [0, 0]]
    ids, mask = pad_batch([[5, 6], [8]], pad_id=0, side="right", width=5)[:2]
    assert trim_padding(ids, mask)[0].tolist() == [[5, 6], [8, 0]]


@pytest.mark.parametrize("family", ["qwen2", "llama", "gemma", "gpt2"])
def test_left_and_right_padding_give_the_same_embeddings(decoders, family):
    tokenizer, model = load(decoders[family])
    ensure_pad_token(tokenizer)
    rows = append_eos_batch(tokenizer(TEXTS)["input_ids"], tokenizer.eos_token_id, 32)
    out = {}
    for side in ("right", "left"):
        ids, mask, pos = pad_batch(rows, tokenizer.pad_token_id, side)
        with torch.no_grad():
            hidden = model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
        out[side] = last_token_pool(hidden, mask), mean_pool(hidden, mask)
    alone = []  # each text alone, unpadded: what both sides must equal
    for row in rows:
        with torch.no_grad():
            alone.append(model(input_ids=torch.tensor([row])).last_hidden_state[0, -1])
    for right, left in zip(*out.values()):
        assert float((right - left).abs().max()) < 1e-5
    assert float((out["left"][0] - torch.stack(alone)).abs().max()) < 1e-5


def test_left_padding_needs_the_positions(decoders):
    """gpt2's absolute positions: left padding without position_ids shifts every real token's position."""
    tokenizer, model = load(decoders["gpt2"])
    ensure_pad_token(tokenizer)
    rows = append_eos_batch(tokenizer(TEXTS)["input_ids"], tokenizer.eos_token_id, 32)
    embeddings = []
    for side in ("right", "left"):
        ids, mask, _ = pad_batch(rows, tokenizer.pad_token_id, side)
        with torch.no_grad():
            embeddings.append(last_token_pool(model(input_ids=ids, attention_mask=mask).last_hidden_state, mask))
    assert float((embeddings[0] - embeddings[1]).abs().max()) > 1e-3


@pytest.mark.parametrize("family", ["qwen2", "llama", "gemma"])
def test_bidirectional_lets_token_0_see_the_suffix_and_is_saved(decoders, family, tmp_path):
    tokenizer, model = load(decoders[family])
    row = tokenizer("a man is playing")["input_ids"]
    ids = torch.tensor([row, row[:-1] + [row[-1] + 1]])  # the same text but its last token

    def token0_change(m) -> float:
        with torch.no_grad():
            first = m(input_ids=ids).last_hidden_state[:, 0]
        return float((first[0] - first[1]).abs().max())

    assert token0_change(model) == 0.0  # causal: a later token never reaches token 0
    set_bidirectional(model)
    assert token0_change(model) > 1e-3
    model.save_pretrained(tmp_path, safe_serialization=True)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert reloaded.config.is_causal is False and token0_change(reloaded) > 1e-3
    assert default_pooling(reloaded.config) == "mean"


def test_bidirectional_is_refused_where_the_model_cannot(decoders):
    from transformers import MambaConfig, MambaModel

    bert = AutoModel.from_config(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                            intermediate_size=64, vocab_size=100))
    with pytest.raises(ValueError, match="'bert' already attends both ways"):
        set_bidirectional(bert)
    recurrent = MambaModel(MambaConfig(hidden_size=32, num_hidden_layers=1, vocab_size=100, state_size=4))
    with pytest.raises(ValueError, match="model type 'mamba' keeps its causal mask"):
        set_bidirectional(recurrent)
    assert getattr(recurrent.config, "is_causal", True) is not False  # the flag is not left behind


def test_the_loss_is_float32_under_bf16_autocast():
    """Under torch.autocast(bfloat16), mnr_loss's similarity matmul runs in bf16 unless autocast is off around
    it: float32_math() + as_float32 give the float32 loss exactly."""
    torch.manual_seed(0)
    anchors, positives = torch.randn(16, 32), torch.randn(16, 32)
    reference = mnr_loss(anchors, positives)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = anchors @ positives.T
        downcast = mnr_loss(anchors, positives)
        with float32_math("cpu"):
            exact = mnr_loss(as_float32(anchors), as_float32(positives))
    assert logits.dtype == torch.bfloat16  # what autocast does to a float32 matmul
    assert abs(float(downcast) - float(reference)) > 1e-4  # mnr.loss alone is computed in bf16 here
    assert float(exact) == pytest.approx(float(reference), abs=1e-6)
    assert as_float32(anchors) is anchors and as_float32(anchors.bfloat16()).dtype == torch.float32


def test_accelerate_bf16_autocasts_the_forward_only(decoders):
    """With mixed_precision bf16 Accelerate autocasts the prepared model's forward: its linear layers run in bf16,
    the pooled embeddings come out float32, and a loss computed outside the forward is float32."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from mnr.model import Encoder, Pipeline

    AcceleratorState._reset_state(True)  # an Accelerator of an earlier test in this process fixed its precision
    tokenizer, transformer = load(decoders["qwen2"])
    encoder = Accelerator(mixed_precision="bf16", cpu=True).prepare(Encoder(transformer, pipeline=Pipeline("lasttoken")))
    states = []
    hook = transformer.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, out: states.append(out.dtype))
    enc = tokenizer(TEXTS, padding=True, return_tensors="pt")
    embeddings = encoder(enc["input_ids"], enc["attention_mask"])
    hook.remove()
    AcceleratorState._reset_state(True)  # later tests' Accelerators choose their own precision
    assert states == [torch.bfloat16] and embeddings.dtype == torch.float32
    assert mnr_loss(embeddings[:2], embeddings[2:]).dtype == torch.float32


def test_cast_state_dict_casts_floating_tensors_only():
    state = {"w": torch.randn(2, 2), "ids": torch.arange(3)}
    bf = cast_state_dict(state, "bfloat16")
    assert bf["w"].dtype == torch.bfloat16 and bf["ids"].dtype == torch.int64
    assert cast_state_dict(bf, "float32")["w"].dtype == torch.float32
    assert cast_state_dict(state, None)["w"] is state["w"]
    with pytest.raises(ValueError, match="save_dtype='int8'"):
        cast_state_dict(state, "int8")


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_length_buckets_run_their_k_chunks_under_left_padding_too(decoders, family):
    """Left padding: the k length buckets still run (each cut to its own longest row where positions come from
    the mask), so every process makes the same forwards, whatever its rows; the embeddings are the unbucketed
    ones."""
    from mnr.model import Encoder, Pipeline

    tokenizer, transformer = load(decoders[family])
    ensure_pad_token(tokenizer)
    texts = [" ".join(["word"] * n) for n in (1, 3, 5, 7, 2, 9, 4, 6)]
    rows = append_eos_batch(tokenizer(texts)["input_ids"], tokenizer.eos_token_id, 32)
    ids, mask, _ = pad_batch(rows, tokenizer.pad_token_id, "left")
    calls = []
    hook = transformer.register_forward_hook(lambda m, i, out: calls.append(1))
    with torch.no_grad():
        whole = Encoder(transformer, 1, Pipeline("mean")).eval()(ids, mask)
        calls.clear()
        bucketed = Encoder(transformer, 2, Pipeline("mean")).eval()(ids, mask)
    hook.remove()
    assert len(calls) == 2 and float((whole - bucketed).abs().max()) < 1e-5
