"""The backbone: the one owner of the model a run trains, loads, evaluates with and exports.

`Backbone` = the Encoder (transformer + pooling, mnr/model.py), its fast tokenizer and its `TokenPolicy`:
  * loading: the base's pooler head kept aside, dtype, trust_remote_code, checks that the model's files agree
    (tokenizer and embedding matrix, config and weights, the JSON files), and `adapt(...)` (through
    `wrap_transformer(fn)`), where a LoRA adapter and gradient checkpointing go on before the model is prepared;
  * the tokenisation policy (`TokenPolicy`): how a text with a role (query or document) becomes token ids and how
    a batch of them is padded.  The token store, the collator, the evaluators, `mnr.mine`, the card and the run
    identity ask it; none of them reads the tokenizer's settings itself;
  * pooling (the Encoder's forward);
  * the collective export: `state_dict()` and `export(path)` are called on every process; the full weights are
    gathered there (where parameters are sharded), and only the main process builds and writes them;
  * `describe()`: the card's rows of what was trained and how it is exported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import logging
import os
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

if TYPE_CHECKING:  # torch is imported where a model is: the token store, which asks the policy, stays without it
    import torch
    from torch import nn

    from mnr.lora import LoraSettings
    from mnr.model import Encoder, Pipeline

logger = logging.getLogger(__name__)

QUERY, DOCUMENT = "query", "document"
PROBE = "A man is playing a guitar in the street, and two children are watching him."
SIDES = ("right", "left")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt",
                   "sentencepiece.bpe.model", "spiece.model", "tokenizer.model", "special_tokens_map.json")
MIN_VOCAB_SHARE = 0.1  # a tokenizer naming fewer than this share of the embedding's rows is not the model's


def pad_tokens(tokens, starts: np.ndarray, lengths: np.ndarray, pad_token_id: int,
               side: str = "right") -> tuple[np.ndarray, np.ndarray]:
    """Rows `tokens[starts[i]:starts[i] + lengths[i]]` of a flat array (a memory map too) -> (input_ids, mask),
    both (n, longest) int64, padded with `pad_token_id` on `side` ("right" or "left")."""
    width = int(lengths.max()) if len(lengths) else 0
    columns = np.arange(width)[None, :]
    shift = (width - lengths)[:, None] if side == "left" else 0  # where each row's first token sits
    position = columns - shift  # (n, width) index into the row; real tokens at 0 .. length-1
    mask = (position >= 0) & (position < lengths[:, None])
    flat = np.asarray(tokens[np.where(mask, starts[:, None] + position, 0)]) if width else np.empty((len(lengths), 0))
    return np.where(mask, flat, pad_token_id).astype(np.int64), mask.astype(np.int64)


@dataclass(frozen=True)
class TokenPolicy:
    """How texts become token ids, for every part of mnr: role prompt first (the prompt counts in max_length),
    then lower-cased when `do_lower_case` (as sentence-transformers does, prompt included), then the fast
    tokenizer with its special tokens, cut at `max_length` on `truncation_side`, an EOS id appended when
    `append_eos` (then within max_length), padded with `pad_token_id` on `padding_side`.

    `fingerprint()` is a pure function of every field and of the tokenizer's whole saved state (vocabulary,
    normalizer, pre-tokenizer, post-processor, added and special tokens): two policies with one fingerprint give
    the same ids for every text."""

    tokenizer: Any = field(compare=False, repr=False)
    max_length: int
    pad_token_id: int = 0
    padding_side: str = "right"
    truncation_side: str = "right"
    append_eos: bool = False  # the tokenizer's post-processor decides the special tokens; no EOS is added to them
    eos_token_id: int | None = None
    do_lower_case: bool = False
    query_prompt: str = ""
    document_prompt: str = ""
    tokenizer_state: str = ""  # sha256 of the tokenizer (`tokenizer_state`)
    # False: a batch also carries each row's prompt length, which the pooling leaves out (the ids are the same)
    include_prompt: bool = field(default=True, compare=False)

    def __post_init__(self):
        for name in ("padding_side", "truncation_side"):
            if getattr(self, name) not in SIDES:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: allowed: {', '.join(SIDES)}")
        if self.append_eos and self.eos_token_id is None:
            raise ValueError("append_eos=True, but the tokenizer has no EOS token")

    @classmethod
    def of(cls, tokenizer, max_length: int, pipeline: Pipeline | None = None) -> "TokenPolicy":
        """The policy of a tokenizer (its padding and truncation sides, pad and EOS tokens) and a pipeline
        (lower-casing, the run's prompts); a tokenizer without a pad token pads with EOS, else 0 (masked out)."""
        pad, eos = getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)
        pad = pad if pad is not None else eos if eos is not None else 0
        return cls(tokenizer=tokenizer, max_length=int(max_length), pad_token_id=int(pad),
                   padding_side=getattr(tokenizer, "padding_side", "right"),
                   truncation_side=getattr(tokenizer, "truncation_side", "right"), eos_token_id=eos, do_lower_case=bool(pipeline and pipeline.do_lower_case),
                   query_prompt=pipeline.query_prompt if pipeline else "",
                   document_prompt=pipeline.document_prompt if pipeline else "",
                   tokenizer_state=tokenizer_state(tokenizer), include_prompt=pipeline.include_prompt if pipeline else True)

    def at_length(self, max_length: int) -> "TokenPolicy":
        return self if max_length == self.max_length else dataclasses.replace(self, max_length=int(max_length))

    def identity(self) -> dict:
        """The tokenizer's part of a run's identity, flat: what a resume must match (the run's max_length and
        prompts are settings of their own there)."""
        return {"tokenizer": self.tokenizer_state[:16], "padding_side": self.padding_side,
                "truncation_side": self.truncation_side, "pad_token_id": self.pad_token_id,
                "append_eos": self.append_eos, "do_lower_case": self.do_lower_case}

    def fingerprint(self) -> str:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.compare}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]

    def prompt(self, role: str | None) -> str:
        """The prompt of `role` ("query", "document"; None: none)."""
        return {QUERY: self.query_prompt, DOCUMENT: self.document_prompt, None: ""}[role]

    def prompt_length(self, prompt: str) -> int:
        """Tokens of `prompt` at the start of every text it prompts, as sentence-transformers counts them for
        `include_prompt: false`: the prompt tokenised alone (special tokens, cased), less a last special token
        (the [SEP] or EOS that ends it alone); 0 for no prompt.  A prompt whose last token merges with the text's
        first (byte-level BPE: "Query: " + "a" -> "Query", ":", " a") is counted as sentence-transformers does."""
        if not prompt:
            return 0
        values, _ = self.token_ids([self.case(prompt)])
        special = set(getattr(self.tokenizer, "all_special_ids", ()) or ())
        return len(values) - int(bool(len(values)) and int(values[-1]) in special)

    def prompt_tokens(self, prompt: str) -> int:
        """Tokens of `prompt` tokenised alone with the special tokens (and the EOS when appended), uncut: a prompt
        of max_length tokens or more leaves no room for any text."""
        ids = self.tokenizer(self.case(prompt), add_special_tokens=True)["input_ids"] if prompt else []
        return len(ids) + int(self.append_eos and (not ids or ids[-1] != self.eos_token_id))

    def left_out(self, role: str | None) -> int:
        """Tokens the pooling leaves out at the start of each text of `role`: its prompt's (`prompt_length`)
        under `include_prompt: false`, else 0."""
        return 0 if self.include_prompt else self.prompt_length(self.prompt(role))

    def case(self, text: str) -> str:
        """The text as it goes into the tokenizer (after its prompt): lower-cased when do_lower_case."""
        return text.lower() if self.do_lower_case else text

    def texts(self, texts: list[str], role: str | None = None) -> list[str]:
        """What is tokenised for `texts` in `role`: prompt + text, lower-cased when do_lower_case."""
        prompt = self.prompt(role)
        return [self.case(prompt + t) for t in texts] if prompt or self.do_lower_case else list(texts)

    def tokenise(self, texts: list[str], role: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of `texts` as queries or documents (role None: no prompt): (int32 values, int64 lengths),
        flattened, unpadded."""
        return self.token_ids(self.texts(texts, role))

    def backend(self):
        """A copy of the fast tokenizer's Rust backend that cuts like this policy and never pads (reused over
        many `token_ids` calls); None for a Python tokenizer."""
        if getattr(self.tokenizer, "backend_tokenizer", None) is None:
            return None
        from tokenizers import Tokenizer

        fast = Tokenizer.from_str(self.tokenizer.backend_tokenizer.to_str())
        fast.no_padding()
        fast.enable_truncation(self.max_length - self.append_eos, direction=self.truncation_side)
        return fast

    def token_ids(self, texts: list[str], backend=None) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of texts already prompted and cased (`texts`), flattened: (int32 values, int64 lengths).
        With the Rust backend only the ids cross into Python (the wrapper's per-text dict of masks would cost
        more than the tokenising)."""
        if backend is None:
            backend = self.backend()
        limit = self.max_length - self.append_eos
        if backend is not None:  # encode_batch_fast (tokenizers >= 0.21) skips the character offsets: ~20% less CPU
            batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
            ids = [e.ids for e in batch(texts, add_special_tokens=True)]
        else:
            tok, saved = self.tokenizer, getattr(self.tokenizer, "truncation_side", "right")
            if saved != self.truncation_side:
                tok.truncation_side = self.truncation_side
            try:
                ids = tok(texts, truncation=True, max_length=limit, add_special_tokens=True)["input_ids"]
            finally:
                if saved != self.truncation_side:
                    tok.truncation_side = saved
        if self.append_eos:
            ids = [row if row and row[-1] == self.eos_token_id else [*row, self.eos_token_id] for row in ids]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        values = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
        return values, lengths

    def batch(self, texts: list[str], role: str | None = None) -> dict[str, torch.Tensor]:
        """`texts` tokenised and padded as one batch: {"input_ids", "attention_mask"}, (n, longest) int64, and
        under `include_prompt: false` with a prompt, "prompt_lengths" (n,) int64 (the Encoder's argument)."""
        import torch

        values, lengths = self.tokenise(texts, role)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        ids, mask = pad_tokens(values, starts, lengths, self.pad_token_id, self.padding_side)
        out = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        prompt = self.left_out(role)
        if prompt:
            out["prompt_lengths"] = torch.full((len(texts),), prompt, dtype=torch.int64)
        return out


def tokenizer_state(tokenizer) -> str:
    """sha256 of what decides a tokenizer's ids: its class and, for a fast one, its whole backend state
    (tokenizer.json: vocabulary, normalizer, pre-tokenizer, post-processor, added tokens) without the
    truncation and padding a call last set; for a Python one its vocabulary and lower-casing."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode() + b"\0")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)  # call-time settings (`tokenizer(..., truncation=True)` sets them)
        state.pop("padding", None)
        digest.update(json.dumps(state, sort_keys=True).encode())
    else:
        digest.update(json.dumps(getattr(tokenizer, "init_kwargs", {}).get("do_lower_case")).encode() + b"\0")
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return digest.hexdigest()


def token_policy(tokens, max_length: int) -> TokenPolicy:
    """`tokens` (a TokenPolicy, or a tokenizer: its default policy) cutting at max_length."""
    if isinstance(tokens, TokenPolicy):
        return tokens.at_length(max_length)
    return TokenPolicy.of(tokens, max_length)


# ---------------------------------------------------------------------------------------------
# loading


@contextlib.contextmanager
def _quiet_load():
    """transformers' load report off (a base saved without pooler weights gets one) and the hub's retry warnings
    printed once: huggingface_hub prints them with its own handler, so they do not go on to the root logger's."""
    import transformers

    hub = logging.getLogger("huggingface_hub")
    verbosity, propagate = transformers.utils.logging.get_verbosity(), hub.propagate
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    hub.propagate = not hub.handlers
    try:
        yield
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
        hub.propagate = propagate


def _load_error(model: str, path: str, err: Exception):
    """One line for an exception of transformers' loading: the file and what is wrong with it where transformers
    does not say (a JSON file that does not parse, weights of other shapes than config.json's), and the offline
    hint for a hub id."""
    from mnr.model import ModelError

    text = str(err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    if isinstance(err, json.JSONDecodeError):
        first = _json_problem(path) or f"a JSON file is not valid JSON ({first})"
    elif isinstance(err, RuntimeError) and "mismatch" in text:
        first = f"config.json does not match the weights: {_mismatch(path)}"
    hint = ""
    if not Path(path).exists() and not os.environ.get("HF_HUB_OFFLINE"):
        hint = ("; without network access set HF_HUB_OFFLINE=1 (the hub cache is used) or pass a local model "
                "directory")
    return ModelError(f"model={model or path!r} cannot be loaded: {first}{hint}")


def _json_problem(path: str) -> str:
    """'<file> is not valid JSON (<why>)' for the first JSON file of a local model directory that does not parse."""
    root = Path(path)
    for f in sorted(root.rglob("*.json")) if root.is_dir() else []:
        try:
            json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            return f"{f.relative_to(root)} is not valid JSON ({err})"
    return ""


def _mismatch(path: str) -> str:
    """The first weight whose shape in the safetensors files differs from the one config.json gives it."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModel

    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in
                        AutoModel.from_config(AutoConfig.from_pretrained(path)).state_dict().items()}
        for f in sorted(Path(path).glob("*.safetensors")):
            with safe_open(str(f), "pt") as weights:
                for key in weights.keys():
                    shape = tuple(weights.get_slice(key).get_shape())
                    for name in (key, key.split(".", 1)[-1]):  # with or without the model's prefix (bert.)
                        if name in expected and expected[name] != shape:
                            return f"{key} is {list(shape)} in {f.name}, config.json makes it {list(expected[name])}"
    except Exception:  # noqa: BLE001 - the description is best effort; the refusal stands without it
        pass
    return "the weights have other shapes than config.json gives them"


def check_tokenizer(model: str, path: str, tokenizer, config) -> None:
    """Refuse a tokenizer that is not the model's: ids beyond the embedding matrix, far fewer tokens than its
    rows (transformers builds a 5-token tokenizer for a directory without tokenizer files), or a probe sentence
    that becomes unknown tokens only."""
    from mnr.model import ModelError

    rows = getattr(config, "vocab_size", None)
    vocab = tokenizer.get_vocab()
    largest = max(vocab.values(), default=-1)
    local = Path(path).is_dir()
    missing = [f for f in TOKENIZER_FILES if local and not (Path(path) / f).is_file()]
    where = f" (no {', '.join(missing[:3])} in {path})" if local and "tokenizer.json" in missing else ""
    if rows and largest >= rows:
        raise ModelError(f"model={model or path!r}: the tokenizer has ids up to {largest}, beyond config.json's "
                         f"vocab_size {rows} (the embedding matrix){where}: the tokenizer is not this model's")
    if rows and len(tokenizer) < MIN_VOCAB_SHARE * rows:
        raise ModelError(f"model={model or path!r}: the tokenizer has {len(tokenizer)} tokens for an embedding of "
                         f"{rows} rows{where}: save the model's tokenizer with it (tokenizer.save_pretrained)")
    ids = tokenizer(PROBE, add_special_tokens=False)["input_ids"]
    unk = tokenizer.unk_token_id
    if ids and unk is not None and all(i == unk for i in ids):
        raise ModelError(f"model={model or path!r}: the tokenizer makes unknown tokens only of a plain English "
                         f"sentence{where}: save the model's tokenizer with it (tokenizer.save_pretrained)")


def load_tokenizer(model: str, trust_remote_code: bool = False, log: bool = True) -> tuple[str, Pipeline, object]:
    """(resolved path, the base's pipeline, its checked fast tokenizer): what a TokenPolicy is made of, without
    the weights.  A decoder's tokenizer gets a pad token where it has none (its EOS; `log`: said in the log) and
    a post-processor that ends every text in exactly one EOS, truncation keeping it (`decoder_tokenizer`)."""
    from transformers import AutoConfig, AutoTokenizer

    from mnr.model import ModelError, check_model_dir, read_pipeline, resolve_model_path

    path = resolve_model_path(model)
    check_model_dir(path)
    pipeline = read_pipeline(path)
    with _quiet_load():
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
            tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True, trust_remote_code=trust_remote_code)
        except ModelError:
            raise
        except (OSError, ValueError, KeyError) as err:  # JSONDecodeError is a ValueError
            raise _load_error(model, path, err) from None
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"model={path!r} has no fast tokenizer (tokenizer.json); mnr needs one")
    check_tokenizer(model, path, tokenizer, config)
    for line in decoder_tokenizer(tokenizer, config):
        if log:
            logger.info(line)
    return path, pipeline, tokenizer


def decoder_tokenizer(tokenizer, config) -> list[str]:
    """For a decoder (`mnr.decoder.is_decoder`): a pad token (EOS) where the tokenizer has none, and the EOS
    appended by its post-processor, so that the store, the evaluators and the saved tokenizer all end each text
    in exactly one EOS (the tokenizer's state, hence the policy's fingerprint, changes with it).  Returns the
    log lines; nothing for an encoder."""
    from mnr.decoder import ensure_pad_token, is_decoder, make_tokenizer_append_eos
    from mnr.model import ModelError

    if not is_decoder(config):
        return []
    try:
        lines = [line for line in [ensure_pad_token(tokenizer)] if line]
        if make_tokenizer_append_eos(tokenizer):
            lines.append(f"decoder: every text ends in the EOS token {tokenizer.eos_token!r} (appended once, kept "
                         f"by truncation)")
    except ValueError as err:
        raise ModelError(f"model={getattr(tokenizer, 'name_or_path', '')!r}: {err}") from None
    return lines


def load_policy(model: str, max_length: int, trust_remote_code: bool = False, pooling: str = "",
                query_prompt: str | None = None, document_prompt: str | None = None) -> TokenPolicy:
    """The TokenPolicy a run of this model would use (tokenizer and sentence-transformers files only)."""
    from mnr.model import pipeline_choices

    _, pipeline, tokenizer = load_tokenizer(model, trust_remote_code, log=False)
    chosen = dataclasses.replace(pipeline, **pipeline_choices(pipeline, pooling, query_prompt, document_prompt))
    return TokenPolicy.of(tokenizer, max_length, chosen)


def _take_out_pooler(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """Remove the pooler head (models whose constructor takes add_pooling_layer run without it) and return its
    weights: the base checkpoint's own, or, when the checkpoint has none, the ones transformers just initialised
    (what `AutoModel.from_pretrained(base)` gives too).  Written back on export, they let `AutoModel` load the
    export without a "newly initialized" report; the sentence embedding never uses them."""
    from torch import nn

    pooler = getattr(transformer, "pooler", None)
    if not isinstance(pooler, nn.Module) or "add_pooling_layer" not in inspect.signature(type(transformer)).parameters:
        return {}
    transformer.pooler = None
    return {f"pooler.{k}": v.detach().clone() for k, v in pooler.state_dict().items()}


class Backbone:
    """The model of a run: `encoder` (the nn.Module that trains; Accelerate prepares it), `tokenizer`, `policy`
    (TokenPolicy) and `path` (where it was loaded from).  `encoder.pipeline` holds the pooling and the prompts,
    `policy` the same prompts as tokenised."""

    def __init__(self, encoder: Encoder, tokenizer, policy: TokenPolicy, path: str = ""):
        self.encoder, self.tokenizer, self.policy, self.path = encoder, tokenizer, policy, path
        self.prepared: nn.Module | None = None  # the encoder as Accelerate wrapped it (`attach`)
        self.save_dtype: str | None = None  # the export's weights: 'float32' / 'bfloat16' (None: as they are)
        self.save_adapter = False  # the export also writes the adapter alone, into adapter/
        self.bidirectional = False  # a decoder attending without its causal mask (`load`)
        self.adapter_dir = ""  # the saved adapter training started from (`adapt`)
        self.checkpointing = False  # gradient checkpointing on (`adapt`)

    @classmethod
    def load(cls, model: str, max_length: int = 128, trust_remote_code: bool = False, dtype=None,
             pooling: str = "", query_prompt: str | None = None, document_prompt: str | None = None,
             length_buckets: int = 1, bidirectional: bool = False, include_prompt: bool | None = None) -> "Backbone":
        """A hub id or local directory ('' = the embedded MiniLM) with the run's pooling, prompts and include_prompt
        (each None / '' = the base's own); ModelError, one line naming the file, when its files do not agree.  bidirectional:
        a decoder attends without its causal mask (`mnr.decoder.set_bidirectional`; ModelError where it cannot)."""
        from safetensors import SafetensorError  # a truncated or overwritten weights file
        from transformers import AutoModel

        from mnr.model import Encoder, ModelError

        path, pipeline, tokenizer = load_tokenizer(model, trust_remote_code)
        with _quiet_load():
            try:
                transformer = AutoModel.from_pretrained(path, use_safetensors=True, trust_remote_code=trust_remote_code,
                                                        **({"dtype": dtype} if dtype is not None else {}))
            except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as err:
                raise _load_error(model, path, err) from None
        if bidirectional:
            from mnr.decoder import set_bidirectional

            try:
                set_bidirectional(transformer)
            except ValueError as err:
                raise ModelError(str(err)) from None
        encoder = Encoder(transformer, length_buckets, pipeline, _take_out_pooler(transformer))
        backbone = cls(encoder, tokenizer, TokenPolicy.of(tokenizer, max_length, pipeline), path)
        backbone.bidirectional = bidirectional
        backbone.choose(pooling, query_prompt, document_prompt, include_prompt)
        return backbone

    def choose(self, pooling: str = "", query_prompt: str | None = None, document_prompt: str | None = None,
               include_prompt: bool | None = None) -> None:
        """The run's pooling, prompts and include_prompt (see mnr.model.choose_pipeline); the policy follows."""
        from mnr.model import choose_pipeline

        choose_pipeline(self.encoder, pooling, query_prompt, document_prompt, include_prompt)
        pipe = self.encoder.pipeline
        self.policy = dataclasses.replace(self.policy, query_prompt=pipe.query_prompt,
                                          document_prompt=pipe.document_prompt, include_prompt=pipe.include_prompt)

    def wrap_transformer(self, fn: Callable[[nn.Module], nn.Module]) -> None:
        """Replace the transformer by `fn(transformer)` (an adapter wrapping it), before the model is prepared."""
        if self.prepared is not None:
            raise RuntimeError("wrap_transformer after the model was prepared")
        self.encoder.transformer = fn(self.encoder.transformer)

    def adapt(self, lora: LoraSettings | None = None, adapter_dir: str = "", gradient_checkpointing: bool = False
              ) -> str:
        """Before the model is prepared: a LoRA adapter on the transformer, the one saved in `adapter_dir` (trained
        on) or else a fresh one of `lora` (mnr.lora; LoraError without peft), then non-reentrant gradient
        checkpointing (mnr.checkpointing; ValueError where the model has none).  Returns the adapter's log line
        (how many parameters train), '' without an adapter."""
        line = ""
        if lora is not None or adapter_dir:
            from mnr.lora import apply_lora, load_adapter, trainable_line

            self.wrap_transformer(lambda t: load_adapter(t, adapter_dir) if adapter_dir else apply_lora(t, lora))
            self.adapter_dir = adapter_dir
            line = f"LoRA {f'from {adapter_dir}' if adapter_dir else lora.describe()}: {trainable_line(self.encoder)}"
        if gradient_checkpointing:
            from mnr.checkpointing import enable_gradient_checkpointing
            from mnr.lora import is_lora

            enable_gradient_checkpointing(self.encoder.transformer, lora=is_lora(self.encoder.transformer))
            self.checkpointing = True
        return line

    def describe(self) -> dict:
        """The card's rows of the adapter (its settings; the export merged), gradient checkpointing, the
        attention and the export dtype (none for a plain model)."""
        from mnr.lora import is_lora

        transformer, rows = self.encoder.transformer, {}
        if is_lora(transformer):
            config = transformer.peft_config[transformer.active_adapter]
            targets = config.target_modules
            targets = targets if isinstance(targets, str) else ",".join(sorted(targets))
            rows["LoRA adapter"] = (f"r={config.r}, alpha={config.lora_alpha}, dropout={config.lora_dropout}, "
                                    f"target_modules={targets}"
                                    + (f", started from {self.adapter_dir}" if self.adapter_dir else ""))
            alone = "; the adapter alone in adapter/" if self.save_adapter else ""
            rows["weights"] = f"merged (base + adapter){alone}"
        if self.checkpointing:
            rows["gradient checkpointing"] = "non-reentrant"
        if self.bidirectional:
            rows["attention"] = "bidirectional (causal mask off)"
        if self.save_dtype:
            rows["export dtype"] = self.save_dtype
        return rows

    def attach(self, prepared: nn.Module) -> None:
        """The encoder as Accelerate prepared it (the one the collective export gathers from)."""
        self.prepared = prepared

    @property
    def config(self):
        return self.encoder.config

    @property
    def pipeline(self) -> Pipeline:
        return self.encoder.pipeline

    def tokenise(self, texts: list[str], role: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        return self.policy.tokenise(texts, role)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              prompt_lengths: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(input_ids, attention_mask, prompt_lengths)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Collective (every process calls it): the export's full weights on the main process, the transformer's
        and the base's pooler head's; {} elsewhere.  Whole parameters (DDP: the prepared model shares the
        encoder's) are read by the main process alone (a merged or cast copy is built once), its error raised on
        every process (`distributed.run_on_main`); a sharded encoder (mnr.sharding) gathers them onto the main
        process's CPU, which merges and casts them (its error raised on every process too).  Under a LoRA adapter: the merged weights, with the base's key names
        (`mnr.lora.merged_state_dict`; sharded: `merge_gathered` of the gathered state).  In `save_dtype`."""
        from mnr import distributed, sharding
        from mnr.decoder import cast_state_dict
        from mnr.lora import is_lora, merge_gathered, merged_state_dict

        transformer = self.encoder.transformer
        if not sharding.is_sharded(self.encoder):
            def whole() -> dict[str, torch.Tensor]:
                weights = merged_state_dict(transformer) if is_lora(transformer) else transformer.state_dict()
                return cast_state_dict({**weights, **self.encoder.unused_weights}, self.save_dtype)

            return distributed.run_on_main(whole) or {}
        full = sharding.full_state_dict(self.encoder)  # {} but on the main process

        def gathered() -> dict[str, torch.Tensor]:
            own = {k.removeprefix("transformer."): v for k, v in full.items() if k.startswith("transformer.")}
            if is_lora(transformer):  # gathered shards: merged from the full state dict
                own = merge_gathered(transformer, own)
            return cast_state_dict({**own, **self.encoder.unused_weights}, self.save_dtype)

        return distributed.run_on_main(gathered) or {}

    def export(self, path: str | os.PathLike, max_seq_length: int | None = None, card: dict | None = None,
               then: Callable[[Path], None] | None = None, stage: Callable | None = None) -> None:
        """Collective (every process calls it): the model in HF + sentence-transformers layout with a model card
        (mnr.model.save_model), and the adapter alone in adapter/ when `save_adapter`, written by the main process
        into `path`, or into the directory that `stage()` (a context manager, e.g. mnr.atomic.atomic_dir) yields
        there; then `then(dir)`.  A failure of the write is raised on every process."""
        from mnr import distributed
        from mnr.lora import save_adapter
        from mnr.model import save_model

        state = self.state_dict()

        def write() -> None:
            with stage() if stage is not None else contextlib.nullcontext(Path(path)) as target:
                save_model(self.encoder, self.tokenizer, target, max_seq_length, card, state=state,
                           policy=self.policy, dtype=self.save_dtype)
                if self.save_adapter:
                    save_adapter(self.encoder.transformer, Path(target) / "adapter", self.pipeline.base_model)
                if then is not None:
                    then(Path(target))

        distributed.run_on_main(write)


def load_encoder(model: str, trust_remote_code: bool = False) -> tuple[Encoder, object]:
    """(encoder, fast tokenizer) of `Backbone.load(model)`."""
    backbone = Backbone.load(model, trust_remote_code=trust_remote_code)
    return backbone.encoder, backbone.tokenizer
