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
from pathlib import Path
from typing import Callable

from mnr import distributed

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
STATE_DIR = "training_state"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or resumed from; the message names it and says why."""


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


def read_state(checkpoint: str | os.PathLike) -> dict:
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file() or not (Path(checkpoint) / STATE_DIR).is_dir():
        raise CheckpointError(f"resume={str(checkpoint)!r} is not a complete mnr checkpoint (no {STATE_FILE} "
                              f"and {STATE_DIR}/)")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"resume={str(checkpoint)!r}: unreadable {STATE_FILE} ({err})") from None


def save_checkpoint(accelerator, output_dir: str | os.PathLike, step: int, state: dict,
                    export_model: Callable[[Path], None], save_total_limit: int = 0) -> Path:
    """Every process calls this (Accelerate saves each process's RNG state). Returns the final path."""
    out = Path(output_dir)
    final = out / f"checkpoint-{step}"
    tmp = out / f"checkpoint-{step}.tmp"
    error = None
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    try:
        accelerator.save_state(str(tmp / STATE_DIR), safe_serialization=True)
        if accelerator.is_main_process:
            export_model(tmp)
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))  # last: marks the checkpoint complete
    except OSError as err:
        error = err
    failed = any(distributed.all_gather_object(error is not None))
    if failed:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(out)
        raise CheckpointError(f"saving checkpoint-{step} failed ({error or 'on another process'}); "
                              f"the previous checkpoint is intact: {previous or 'none yet'}")
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if save_total_limit:
            for old in list_checkpoints(out)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def load_checkpoint(accelerator, checkpoint: str | os.PathLike) -> dict:
    """Restore model, optimizer, scheduler, scaler and RNG states (tensors loaded with weights_only=True)."""
    state = read_state(checkpoint)
    accelerator.load_state(str(Path(checkpoint) / STATE_DIR), load_kwargs={"weights_only": True})
    return state
