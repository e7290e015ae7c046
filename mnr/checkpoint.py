"""Checkpoints: atomic saves of model + full training state, finding the newest complete one, rotation.

Layout of `<output_dir>/checkpoint-<step>/`:
    model files (safetensors, config, tokenizer, sentence-transformers files) -- loadable as a model
    training_state/    Accelerate's save_state: model, optimizer, scheduler, scaler, RNG of every process
    trainer_state.json position (epoch, step in epoch, global step), run shape, best score; written last
A checkpoint is written as `checkpoint-<step>.tmp` and renamed when complete, so a crash mid-save leaves
the previous checkpoint as the newest complete one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from mnr import distributed

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
STATE_DIR = "training_state"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or resumed from; the message names it and says why."""


# The run shape: settings a resume must match, because the data order and every process's RNG stream are
# functions of them. Listed once; written into every checkpoint and compared on resume.
RUN_SHAPE_KEYS = ("world_size", "batch_size", "seed", "hard_negatives", "length_grouping")


def run_shape(cfg, world_size: int) -> dict:
    """This run's values of RUN_SHAPE_KEYS (cfg: a TrainConfig)."""
    return {key: world_size if key == "world_size" else getattr(cfg, key) for key in RUN_SHAPE_KEYS}


@dataclass
class TrainState:
    """Where training is (the resumable data position and counters), what it must match, and what it keeps
    across a resume; `to_dict()` is trainer_state.json (flat, as written since the first release)."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_score: float | None = None
    skipped_steps: int = 0
    metrics_before: dict = field(default_factory=dict)  # "evaluator/metric" -> score before training (model card)
    shape: dict = field(default_factory=dict)  # RUN_SHAPE_KEYS -> value
    scheduler: dict = field(default_factory=dict)  # LambdaLR state without its lambdas

    def to_dict(self) -> dict:
        out = asdict(self)
        return {**{k: v for k, v in out.items() if k != "shape"}, **self.shape}

    @classmethod
    def from_dict(cls, data: dict) -> "TrainState":
        return cls(epoch=data["epoch"], step_in_epoch=data["step_in_epoch"], global_step=data["global_step"],
                   best_score=data.get("best_score"), skipped_steps=data.get("skipped_steps", 0),
                   metrics_before=data.get("metrics_before") or {}, shape={k: data.get(k) for k in RUN_SHAPE_KEYS},
                   scheduler=data.get("scheduler", {}))

    def check_same_shape(self, now: dict, checkpoint: str | os.PathLike) -> None:
        """Stop with a clear message when this run's shape differs from the checkpoint's."""
        for key in RUN_SHAPE_KEYS:
            if self.shape.get(key) != now[key]:
                raise CheckpointError(f"cannot resume from {checkpoint}: it was saved with {key}={self.shape.get(key)!r}, "
                                      f"this run has {key}={now[key]!r}; resume with the same setting (or start a "
                                      f"new run)")


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete step checkpoints (with trainer_state.json), oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = _CKPT.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def read_state(checkpoint: str | os.PathLike) -> TrainState:
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file() or not (Path(checkpoint) / STATE_DIR).is_dir():
        raise CheckpointError(f"resume={str(checkpoint)!r} is not a complete mnr checkpoint (no {STATE_FILE} "
                              f"and {STATE_DIR}/)")
    try:
        return TrainState.from_dict(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"resume={str(checkpoint)!r}: unreadable {STATE_FILE} ({err})") from None
    except (KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"resume={str(checkpoint)!r}: {STATE_FILE} is damaged (missing or bad field "
                              f"{err})") from None


def save_checkpoint(accelerator, output_dir: str | os.PathLike, step: int, state: TrainState,
                    export_model: Callable[[Path], None], save_total_limit: int = 0) -> Path:
    """Every process calls this (Accelerate saves each process's RNG state). Returns the final path."""
    out = Path(output_dir)
    final = out / f"checkpoint-{step}"
    tmp = out / f"checkpoint-{step}.tmp"
    error = None
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    try:
        accelerator.save_state(str(tmp / STATE_DIR), safe_serialization=True)
        if distributed.is_main():
            export_model(tmp)
            (tmp / STATE_FILE).write_text(json.dumps(state.to_dict(), indent=2))  # last: marks the checkpoint complete
    except OSError as err:
        error = err
    failed = any(distributed.all_gather_object(error is not None))
    if failed:
        if distributed.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(out)
        raise CheckpointError(f"saving checkpoint-{step} failed ({error or 'on another process'}); "
                              f"the previous checkpoint is intact: {previous or 'none yet'}")
    if distributed.is_main():
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if save_total_limit:
            for old in list_checkpoints(out)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def load_checkpoint(accelerator, checkpoint: str | os.PathLike) -> None:
    """Restore model, optimizer, scaler and RNG states (tensors loaded with weights_only=True)."""
    accelerator.load_state(str(Path(checkpoint) / STATE_DIR), load_kwargs={"weights_only": True})
