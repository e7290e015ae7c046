"""Decoder (LLM) backbones: the token policy they need, as pure functions on token ids, a tokenizer or a model.

Invariants:
- every text ends in exactly one EOS, counted in the maximum length: truncation cuts the text, never the EOS
  (nor a leading BOS);
- `pad_batch` gives each row's real tokens the positions 0, 1, ... whatever the padding side, so that left and
  right padding give the same token states (and embeddings) for decoders;
- `set_bidirectional` writes its switch into the model's config, so a saved model loads attending both ways.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

# model_type of the causal-LM families AutoModel loads as a decoder (a config naming a *ForCausalLM
# architecture, or is_decoder=True, counts too)
DECODER_TYPES = frozenset("""
    llama mistral mixtral ministral qwen2 qwen2_moe qwen3 qwen3_moe gemma gemma2 gemma3 gemma3_text phi phi3 phimoe
    gpt2 gpt_neo gpt_neox gptj opt bloom falcon mpt stablelm starcoder2 olmo olmo2 cohere cohere2 granite
    granitemoe internlm2 deepseek_v2 deepseek_v3 minicpm glm glm4 exaone smollm3 helium codegen xglm ctrl
    mamba mamba2 falcon_mamba rwkv recurrent_gemma jamba
""".split())
# bidirectional encoders: decoders only with is_decoder=True, whatever their architectures say
ENCODER_TYPES = frozenset("bert roberta xlm-roberta camembert mpnet distilbert deberta deberta-v2 electra "
                          "modernbert nomic_bert new albert xlnet".split())


def is_decoder(config) -> bool:
    """A causal language model family (last-token pooling, EOS, left padding apply); False for encoders."""
    model_type = getattr(config, "model_type", "")
    if getattr(config, "is_decoder", False) is True:  # e.g. a BERT trained as a causal LM
        return True
    if model_type in ENCODER_TYPES:
        return False
    if model_type in DECODER_TYPES:
        return True
    return any(str(a).endswith("ForCausalLM") for a in getattr(config, "architectures", None) or ())


def default_pooling(config) -> str:
    """sentence-transformers' choice: 'lasttoken' for a decoder that attends causally, else 'mean' (a decoder
    switched to bidirectional attention pools like an encoder)."""
    return "lasttoken" if is_decoder(config) and getattr(config, "is_causal", True) is not False else "mean"


# --- EOS exactly once -----------------------------------------------------------------------------------------

def append_eos(ids: Sequence[int], eos_id: int, max_len: int | None = None, side: str = "right",
               bos_id: int | None = None) -> list[int]:
    """`ids` ending in exactly one EOS, at most `max_len` long: EOS is appended unless `ids` already ends in it
    (a tokenizer whose post-processor adds it); a longer row loses text tokens on `side` ('right': its end,
    'left': its start), never the EOS, nor a leading `bos_id`."""
    if side not in ("right", "left"):
        raise ValueError(f"side={side!r}; one of right, left")
    ids = list(ids)
    if ids and ids[-1] == eos_id:
        ids.pop()
    head = [ids.pop(0)] if bos_id is not None and ids and ids[0] == bos_id else []
    if max_len is not None:
        room = max_len - len(head) - 1
        if room < 0:
            raise ValueError(f"max_len={max_len} leaves no room for the EOS{' and BOS' if head else ''}")
        if len(ids) > room:
            ids = ids[:room] if side == "right" else ids[len(ids) - room:]
    return head + ids + [eos_id]


def append_eos_batch(rows: Sequence[Sequence[int]], eos_id: int, max_len: int | None = None, side: str = "right",
                     bos_id: int | None = None) -> list[list[int]]:
    """`append_eos` on every row."""
    return [append_eos(row, eos_id, max_len, side, bos_id) for row in rows]


# --- pad token and padding ------------------------------------------------------------------------------------

def ensure_pad_token(tokenizer) -> str | None:
    """Give a tokenizer without a pad token its EOS as pad token; returns the log line saying so (None when the
    tokenizer has a pad token).  Which id pads never matters for the embeddings: padding is masked."""
    if tokenizer.pad_token is not None:
        return None
    if tokenizer.eos_token is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has neither a pad nor an EOS token")
    tokenizer.pad_token = tokenizer.eos_token
    return f"the tokenizer has no pad token: padding with its EOS token {tokenizer.eos_token!r} (id {tokenizer.pad_token_id})"


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(n, T) mask -> (n, T) positions counting each row's real tokens from 0 (padding gets 0), for either
    padding side."""
    return ((attention_mask.long().cumsum(dim=1) - 1).clamp(min=0) * attention_mask.long())


def pad_batch(rows: Sequence[Sequence[int]], pad_id: int, side: str = "right",
              width: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-id rows -> (input_ids, attention_mask, position_ids), each (n, T) int64, T = `width` or the longest
    row; padding on `side` ('right' or 'left')."""
    if side not in ("right", "left"):
        raise ValueError(f"side={side!r}; one of right, left")
    longest = max((len(r) for r in rows), default=0)
    width = longest if width is None else width
    if width < longest:
        raise ValueError(f"width={width} is shorter than the longest row ({longest} tokens)")
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        cols = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        input_ids[i, cols] = torch.as_tensor(list(row), dtype=torch.long)
        attention_mask[i, cols] = 1
    return input_ids, attention_mask, position_ids(attention_mask)


# --- bidirectional attention ----------------------------------------------------------------------------------

def set_bidirectional(model: torch.nn.Module) -> None:
    """Attend without the causal mask: sets `config.is_causal = False` (read by transformers' mask builders,
    and by sentence-transformers) and `use_bidirectional_attention = True` where the config has it (Gemma
    families), then checks with a 4-token forward that token 0 now sees the tokens after it.  ValueError
    naming the model type where it does not (the flags are then restored).  The config is saved with the
    model, so the export loads attending both ways."""
    config = model.config
    model_type = getattr(config, "model_type", "?")
    if not is_decoder(config):
        raise ValueError(f"--bidirectional is for decoders; model type {model_type!r} already attends both ways")
    before = {k: getattr(config, k) for k in ("is_causal", "use_bidirectional_attention") if hasattr(config, k)}
    config.is_causal = False
    if hasattr(config, "use_bidirectional_attention"):
        config.use_bidirectional_attention = True
    if not _token0_sees_suffix(model):
        for k in ("is_causal", "use_bidirectional_attention"):
            if k in before:
                setattr(config, k, before[k])
            elif hasattr(config, k):
                delattr(config, k)
        import transformers

        raise ValueError(f"--bidirectional: model type {model_type!r} keeps its causal mask under transformers "
                         f"{transformers.__version__} (it honours neither is_causal nor use_bidirectional_attention)")


def _token0_sees_suffix(model: torch.nn.Module) -> bool:
    """Does the state of token 0 change with the last token?  (Exactly unchanged under a causal mask.)"""
    param = next(model.parameters())
    vocab = int(getattr(model.config, "vocab_size", 8) or 8)
    ids = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 5]], device=param.device) % vocab
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[:, 0].float()
    finally:
        model.train(was_training)
    return float((hidden[0] - hidden[1]).abs().max()) > 1e-4 * max(1.0, float(hidden[0].abs().max()))


# --- float32 similarities under autocast ----------------------------------------------------------------------

def as_float32(t: torch.Tensor) -> torch.Tensor:
    """`t` in float32 (no copy when it already is)."""
    return t if t.dtype == torch.float32 else t.float()


@contextlib.contextmanager
def float32_math(device_type: str = "cpu") -> Iterator[None]:
    """Autocast off inside: a matmul of float32 tensors stays float32 (under `torch.autocast(..., bfloat16)`,
    upcasting the inputs alone does not: autocast casts them back down)."""
    with torch.autocast(device_type=device_type, enabled=False):
        yield


def cast_state_dict(state: dict[str, torch.Tensor], dtype: str | None) -> dict[str, torch.Tensor]:
    """The export's weights in `dtype` ('float32' or 'bfloat16'; None: unchanged).  Only floating
    tensors are cast (integer buffers such as position ids keep their type)."""
    if dtype is None:
        return dict(state)
    target = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype)
    if target is None:
        raise ValueError(f"save_dtype={dtype!r}; one of float32, bfloat16")
    return {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}


def write_config_dtype(path, dtype: str | None) -> None:
    """config.json in `path` names `dtype` (save_pretrained writes the dtype of the parameters in memory, not
    of the state it was given); None: left as written."""
    import json
    from pathlib import Path

    if dtype is not None:
        config = Path(path) / "config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "dtype": dtype}, indent=2) + "\n")


def tokenizer_appends_eos(tokenizer) -> bool:
    """Does the tokenizer end every encoded text in its EOS by itself (its post-processor)?"""
    ids = tokenizer("a")["input_ids"]
    return tokenizer.eos_token_id is not None and bool(ids) and ids[-1] == tokenizer.eos_token_id


def make_tokenizer_append_eos(tokenizer) -> bool:
    """Make the tokenizer's post-processor append its EOS (keeping the special tokens it puts before the text,
    a BOS), so that every user of the saved tokenizer (sentence-transformers, AutoTokenizer, mnr's evaluators)
    encodes texts as training did, EOS exactly once, truncation keeping it.  Returns False when it already
    does.  ValueError for a tokenizer without EOS, or one that puts special tokens after the text."""
    from tokenizers import processors

    eos = tokenizer.eos_token
    if eos is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no EOS token to append")
    if tokenizer_appends_eos(tokenizer):
        return False
    plain, full = tokenizer("a", add_special_tokens=False)["input_ids"], tokenizer("a")["input_ids"]
    if full[len(full) - len(plain):] != plain:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} adds special tokens after the "
                         f"text: {tokenizer.convert_ids_to_tokens(full)}; mnr cannot add the EOS to it")
    prefix = tokenizer.convert_ids_to_tokens(full[:len(full) - len(plain)])
    specials = dict(zip(prefix, full[:len(prefix)])) | {eos: tokenizer.eos_token_id}
    head = " ".join(f"{t}:0" for t in prefix)
    template = processors.TemplateProcessing(
        single=f"{head} $A:0 {eos}:0".strip(), pair=f"{head} $A:0 {eos}:0 $B:1 {eos}:1".strip(),
        special_tokens=list(specials.items()))
    backend = tokenizer.backend_tokenizer
    # a ByteLevel post-processor only trims offsets: keep it in front of the template
    backend.post_processor = (processors.Sequence([backend.post_processor, template])
                              if isinstance(backend.post_processor, processors.ByteLevel) else template)
    return True
