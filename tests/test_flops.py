"""The FLOP meter (mnr.flops): parameter counts from the config equal the models' own, the step FLOPs equal the
analytic 6 N tokens + attention formula, and MFU is reported only where the chip's peak is known."""

from __future__ import annotations

import pytest
from transformers import (BertConfig, BertModel, LlamaConfig, LlamaModel, MistralConfig, MistralModel, Qwen2Config,
                          Qwen2Model, Qwen3Config, Qwen3Model, RobertaConfig, RobertaModel)

from mnr.flops import (count_non_embedding_params, forward_flops, mfu, model_shape, non_embedding_params, peak_flops,
                       step_flops)

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100,
             max_position_embeddings=64)
DECODER = dict(SMALL, num_key_value_heads=2)
MODELS = {
    "bert": lambda: BertModel(BertConfig(**SMALL), add_pooling_layer=False),
    "bert with pooler": lambda: BertModel(BertConfig(**SMALL)),
    "roberta": lambda: RobertaModel(RobertaConfig(**SMALL), add_pooling_layer=False),
    "llama": lambda: LlamaModel(LlamaConfig(**DECODER)),
    "llama with biases": lambda: LlamaModel(LlamaConfig(**DECODER, attention_bias=True, mlp_bias=True)),
    "mistral": lambda: MistralModel(MistralConfig(**DECODER)),
    "qwen2": lambda: Qwen2Model(Qwen2Config(**DECODER)),
    "qwen3": lambda: Qwen3Model(Qwen3Config(**DECODER, head_dim=16)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_non_embedding_parameters_from_the_config_equal_the_models_count(name):
    model = MODELS[name]()
    expected = sum(p.numel() for n, p in model.named_parameters()
                   if not n.startswith(("embeddings.", "embed_tokens.", "pooler.")))
    assert count_non_embedding_params(model) == expected
    assert non_embedding_params(model.config) == expected


def test_bert_base_has_85_1m_non_embedding_parameters():
    assert non_embedding_params(BertConfig()) == 85_054_464  # 12 x (4*768^2 + 2*768*3072 + 9*768 + 3072)


def test_step_flops_are_6_n_tokens_plus_attention():
    config = BertConfig()
    shape = model_shape(config)
    n, lengths = 85_054_464, [12, 30, 7, 1]
    attention = 4 * 12 * 768 * (12**2 + 30**2 + 7**2 + 1)  # QK^T and AV, 2 FLOPs per multiply-add, per text
    assert forward_flops(shape, lengths) == pytest.approx(2 * n * 50 + attention, rel=1e-12)
    assert step_flops(shape, lengths) == pytest.approx(6 * n * 50 + 3 * attention, rel=1e-12)
    assert step_flops(shape, lengths, gradcache=True) == pytest.approx(8 * n * 50 + 4 * attention, rel=1e-12)
    qwen3 = model_shape(Qwen3Config(**DECODER, head_dim=16))
    assert qwen3.attention_width == 4 * 16  # heads x head_dim, not hidden


def test_a_model_type_without_a_config_count_is_counted_on_the_model():
    from transformers import MPNetConfig, MPNetModel

    model = MPNetModel(MPNetConfig(**SMALL), add_pooling_layer=False)
    assert model_shape(model.config, model).non_embedding_params == count_non_embedding_params(model)
    with pytest.raises(ValueError, match="model_type='mpnet'"):
        model_shape(model.config)


def test_mfu_only_where_the_peak_is_known():
    assert peak_flops("NVIDIA H200") == 989e12 and peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops(None) is None and peak_flops("cpu") is None
    assert mfu(494.5e12, peak_flops("NVIDIA H200")) == pytest.approx(0.5)
    assert mfu(1e12, None) is None
