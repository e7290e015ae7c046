"""Tiny random decoders (Qwen2, Llama, Mistral, Gemma) saved like hub models, built in about a second, offline.

`build_tiny_decoder(path, family)` writes config.json, model.safetensors and a byte-level BPE tokenizer trained
on a few hundred sentences, so that `AutoTokenizer.from_pretrained(path)` and `AutoModel.from_pretrained(path)`
load it with no network.  The variants exercise the tokenizer policies a decoder backbone meets:
- qwen2: eos `<|im_end|>`, pad `<|endoftext|>` (Qwen2-Instruct's pair);
- qwen2_eos: eos and pad `<|endoftext|>`, and a post-processor that appends `<|endoftext|>` itself
  (as Qwen3-Embedding's tokenizer does);
- llama: bos `<s>` added by the post-processor, eos `</s>`, NO pad token;
- mistral / gemma: bos + eos, no pad token (mistral), pad `<pad>` (gemma);
- gpt2: absolute position embeddings (so positions under left padding matter), eos `<|endoftext|>`, no pad.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

from conftest import WORDS

LAYERS, HIDDEN, HEADS, KV_HEADS, INTERMEDIATE = 2, 32, 4, 2, 64
FAMILIES = ("qwen2", "qwen2_eos", "llama", "mistral", "gemma", "gpt2")
# family -> (model_type, bos, eos, pad, the post-processor appends eos, prepends bos)
_SPEC = {
    "qwen2": ("qwen2", None, "<|im_end|>", "<|endoftext|>", False),
    "qwen2_eos": ("qwen2", None, "<|endoftext|>", "<|endoftext|>", True),
    "llama": ("llama", "<s>", "</s>", None, False),
    "mistral": ("mistral", "<s>", "</s>", None, False),
    "gemma": ("gemma", "<bos>", "<eos>", "<pad>", False),
    "gpt2": ("gpt2", None, "<|endoftext|>", None, False),
}


def sentences(n: int = 400) -> list[str]:
    """Deterministic word salad over conftest.WORDS (with digits and punctuation) to train the BPE on."""
    out = []
    for i in range(n):
        words = [WORDS[(i * 7 + j * 13) % len(WORDS)] for j in range(4 + i % 9)]
        out.append(f"{' '.join(words).capitalize()} {i}{'.?!,'[i % 4]}")
    return out


@functools.lru_cache(maxsize=None)
def _bpe_json(specials: tuple[str, ...], vocab_size: int) -> str:
    """A byte-level BPE (GPT-2 style) trained on `sentences()`, as tokenizer.json text; specials come first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(sentences(), trainer)
    return tok.to_str()


def _tokenizer(family: str, vocab_size: int):
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    model_type, bos, eos, pad, appends_eos = _SPEC[family]
    specials = tuple(dict.fromkeys(t for t in (bos, eos, pad, "<|endoftext|>") if t))
    tok = Tokenizer.from_str(_bpe_json(specials, vocab_size))
    single = " ".join(([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if appends_eos else []))
    pair = " ".join(([f"{bos}:0"] if bos else []) + ["$A:0", "$B:1"] + ([f"{eos}:1"] if appends_eos else []))
    if single != "$A:0":
        tok.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(t, tok.token_to_id(t)) for t in specials if t in (bos, eos)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    kwargs = {k: v for k, v in (("bos_token", bos), ("eos_token", eos), ("pad_token", pad)) if v}
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=64, **kwargs), model_type


def _config(model_type: str, tokenizer, dropout: float, max_positions: int):
    from transformers import AutoConfig

    ids = {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad")}
    if model_type == "gpt2":
        return AutoConfig.for_model(model_type, vocab_size=len(tokenizer), n_embd=HIDDEN, n_layer=LAYERS,
                                    n_head=HEADS, n_inner=INTERMEDIATE, n_positions=max_positions,
                                    attn_pdrop=dropout, resid_pdrop=dropout, embd_pdrop=dropout, **ids)
    extra = {"use_sliding_window": False} if model_type == "qwen2" else {}
    config = AutoConfig.for_model(
        model_type, vocab_size=len(tokenizer), hidden_size=HIDDEN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, intermediate_size=INTERMEDIATE,
        head_dim=HIDDEN // HEADS, max_position_embeddings=max_positions, attention_dropout=dropout,
        tie_word_embeddings=False, **ids, **extra)
    return config


def build_tiny_decoder(path: Path, family: str = "qwen2", *, dropout: float = 0.0, seed: int = 0,
                       vocab_size: int = 400, max_positions: int = 128) -> Path:
    """A random 2-layer decoder of `family` (FAMILIES), saved with its tokenizer as a hub model would be.
    dropout: the attention dropout (the only one of these families but gpt2)."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    if family not in _SPEC:
        raise ValueError(f"family={family!r}; one of {', '.join(FAMILIES)}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer, model_type = _tokenizer(family, vocab_size)
    tokenizer.save_pretrained(path)
    torch.manual_seed(seed)
    config = _config(model_type, tokenizer, dropout, max_positions)
    AutoModel.from_config(config).save_pretrained(path, safe_serialization=True)
    # save_pretrained names the class it saved (Qwen2Model); a hub decoder's config names its causal-LM class,
    # which sentence-transformers reads to choose last-token pooling
    saved = json.loads((path / "config.json").read_text())
    saved["architectures"] = [AutoModelForCausalLM._model_mapping[type(config)].__name__]
    (path / "config.json").write_text(json.dumps(saved, indent=2))
    return path


@functools.lru_cache(maxsize=None)
def cached_decoder(family: str = "qwen2", dropout: float = 0.0) -> Path:
    """`build_tiny_decoder` once per process (in a temporary folder removed at exit): for module fixtures."""
    root = Path(tempfile.mkdtemp(prefix="mnr-tiny-decoders-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return build_tiny_decoder(root / f"{family}-{dropout}", family, dropout=dropout)
