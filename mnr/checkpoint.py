"""Checkpoints: atomic saves of model + full training state, finding the newest complete one, rotation.

Layout of `<output_dir>/checkpoint-<step>/`:
    model files (safetensors, config, tokenizer, sentence-transformers files) -- loadable as a model
    training_state/    Accelerate's save_state: model, optimizer, scheduler, scaler, RNG of every process;
                       a sharded model (FSDP2): RNG only, model + optimizer in training_state/sharded/ (each
                       process's shard, mnr.sharding.save_sharded)
    trainer_state.json position (epoch, step in epoch, global step), run identity, best score, and the size of
                       every other file of the checkpoint; written last
A checkpoint is written as `checkpoint-<step>.tmp` and renamed when complete, so a crash mid-save leaves
the previous checkpoint as the newest complete one; a file damaged later (truncated, missing) is found by its
size before anything is loaded, and `--resume auto` falls back to the previous intact checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from mnr import distributed
from mnr.atomic import fsync_tree, is_write_failure, replace, write_error
from mnr.sharding import load_sharded, save_sharded

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
STATE_DIR = "training_state"
SHARDED_DIR = "sharded"  # inside STATE_DIR: model + optimizer of a sharded run
_CKPT = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or resumed from; the message names it and says why."""


# Run identity: what determines the weights a run produces. Every TrainConfig field is in it except these,
# which may change between a run and its resume (docs/reliability.md, "Run identity", lists them). Data, model
# and eval files enter by content hash, so an edited file under the same name is a different run.
MAY_CHANGE_ON_RESUME = ("log_steps", "eval_steps", "save_steps", "save_total_limit", "progress", "report_to",
                        "resume", "output_dir", "overwrite_output_dir", "cache_dir", "config", "skip_nonfinite",
                        "eval_dims", "ddp_timeout", "save_adapter", "save_dtype")
_FULL_HASH_LIMIT = 1 << 30  # weight files above 1 GiB: hash of the safetensors header + size + mtime instead


def run_identity(cfg, world_size: int, model_path: str, train_spec: str, eval_spec: str, objective=None) -> dict:
    """The fingerprint of a run, flat (key -> value), compared key by key on resume (cfg: a TrainConfig; the loss's
    entries are the objective's `identity()`, default the one the config chooses)."""
    from mnr.backbone import load_policy
    from mnr.model import ModelError, pipeline_choices, read_pipeline
    from mnr.objectives import OBJECTIVE_FIELDS, objective_from_config

    settings = {k: v for k, v in cfg.to_dict().items() if k not in MAY_CHANGE_ON_RESUME}
    # the config's loss fields as the objective states them (None: not a setting of it), then entries of its own
    settings.update(dict.fromkeys(OBJECTIVE_FIELDS) | (objective or objective_from_config(cfg)).identity())
    # pooling and prompts as the run uses them (a default follows the base model's sentence-transformers files)
    choices = pipeline_choices(read_pipeline(model_path), cfg.pooling, cfg.query_prompt, cfg.document_prompt,
                               cfg.include_prompt)
    settings.update(choices)
    settings["include_prompt"] = None if choices["include_prompt"] else False  # in its place: None, the prompt pooled
    # the tokenizer as the run tokenises (its whole state, sides, pad token, lower-casing): a switch refuses to resume
    try:
        settings.update(load_policy(model_path, cfg.max_seq_length, cfg.trust_remote_code).identity())
    except ModelError:  # no usable tokenizer: loading the model stops the run, with this message
        pass
    # an adapter to start from enters by content too (a run without one has no such key)
    adapter = {"lora_adapter_files": _model_hash(cfg.lora_adapter, "adapter_config.json")} if cfg.lora_adapter else {}
    return {"world_size": world_size, **settings, "model_files": _model_hash(model_path), **adapter,
            "train_data_files": _sources_hash(train_spec), "eval_data_files": _sources_hash(eval_spec)}


def identity_changes(saved: dict, now: dict) -> list[str]:
    """'key: saved -> now' for every key that differs (a key missing on one side counts as None)."""
    return [f"{key}: {saved.get(key)!r} -> {now.get(key)!r}" for key in sorted(set(saved) | set(now))
            if saved.get(key) != now.get(key)]


def _sources_hash(spec: str) -> str:
    """sha256 over every comma-separated source: a local file's bytes (a `path*weight` source: path's), a hub name
    as given."""
    digest = hashlib.sha256()
    for source in (s.strip() for s in spec.split(",") if s.strip()):
        digest.update(source.encode() + b"\0")
        path = source if os.path.isfile(source) else source.rsplit("*", 1)[0].strip()
        if os.path.isfile(path):
            _hash_file(digest, Path(path))
    return digest.hexdigest()[:16]


def _model_hash(model_path: str, config_file: str = "config.json") -> str:
    """A local model (or adapter) directory: its `config_file` and the weights (whole files up to 1 GiB, else
    header, size and mtime); a hub id: the id."""
    root = Path(model_path)
    digest = hashlib.sha256(str(model_path).encode())
    if not root.is_dir():
        return digest.hexdigest()[:16]
    for f in sorted(root.glob("*.safetensors")) + [root / config_file]:
        if not f.is_file():
            continue
        digest.update(f.name.encode())
        if f.stat().st_size <= _FULL_HASH_LIMIT:
            _hash_file(digest, f)
        else:  # the safetensors header (names, shapes, offsets), size and mtime: not GBs of reading
            with open(f, "rb") as fh:
                digest.update(fh.read(min(int.from_bytes(fh.read(8), "little"), 100 << 20)))
            digest.update(f"{f.stat().st_size} {f.stat().st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _hash_file(digest, path: Path) -> None:
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as err:  # unreadable: loading the file names the problem; the hash only records it
        digest.update(f"unreadable: {err.strerror}".encode())


@dataclass
class TrainState:
    """Where training is (the resumable data position and counters), what run it belongs to, and what it keeps
    across a resume; `to_dict()` is trainer_state.json."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_score: float | None = None
    skipped_steps: int = 0
    metrics_before: dict = field(default_factory=dict)  # "evaluator/metric" -> score before training (model card)
    run_identity: dict = field(default_factory=dict)  # run_identity(...) of the run that wrote it
    scheduler: dict = field(default_factory=dict)  # LambdaLR state without its lambdas
    files: dict = field(default_factory=dict)  # relative path -> size of every file of the checkpoint

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        """trainer_state.json: strict JSON (a score that is not a number, NaN, is null)."""
        from mnr.reporting import json_ready

        return json.dumps(json_ready(self.to_dict()), indent=2, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainState":
        for key in ("epoch", "step_in_epoch", "global_step"):
            if not isinstance(data[key], int) or data[key] < 0:
                raise TypeError(f"{key}={data[key]!r}")
        return cls(epoch=data["epoch"], step_in_epoch=data["step_in_epoch"], global_step=data["global_step"],
                   best_score=data.get("best_score"), skipped_steps=data.get("skipped_steps", 0),
                   metrics_before=data.get("metrics_before") or {}, run_identity=data["run_identity"],
                   scheduler=data["scheduler"], files=data.get("files", {}))

    def check_same_run(self, now: dict, checkpoint: str | os.PathLike) -> None:
        """Stop, naming every changed setting with its saved and its new value, when this run is not the
        checkpoint's run."""
        changes = identity_changes(self.run_identity, now)
        if changes:
            raise CheckpointError(f"cannot resume from {checkpoint}: it belongs to another run ({'; '.join(changes)}); "
                                  f"resume with the same settings and data, or start a new run in another "
                                  f"output dir")


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
    """The checkpoint's state, after checking every file it lists is there with its saved size (a truncated or
    missing file is named); raises CheckpointError."""
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file() or not (Path(checkpoint) / STATE_DIR).is_dir():
        raise CheckpointError(f"resume={str(checkpoint)!r} is not a complete mnr checkpoint (no {STATE_FILE} "
                              f"and {STATE_DIR}/)")
    try:
        state = TrainState.from_dict(json.loads(path.read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"resume={str(checkpoint)!r}: unreadable {STATE_FILE} ({err})") from None
    except (KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"resume={str(checkpoint)!r}: {STATE_FILE} is damaged (missing or bad field "
                              f"{err})") from None
    for rel, size in state.files.items():
        f = Path(checkpoint) / rel
        found = f.stat().st_size if f.is_file() else None
        if found != size:
            raise CheckpointError(f"resume={str(checkpoint)!r}: {rel} is damaged ({'missing' if found is None else f'{found} bytes'}, "
                                  f"saved with {size})")
    return state


def newest_intact_checkpoint(output_dir: str | os.PathLike) -> tuple[Path, TrainState] | None:
    """The newest checkpoint that reads back whole; each damaged newer one is skipped with a warning, and when
    none is intact the newest one's damage is the error."""
    first_error = None
    for ckpt in reversed(list_checkpoints(output_dir)):
        try:
            return ckpt, read_state(ckpt)
        except CheckpointError as err:
            if distributed.is_main():  # every process checks; one says so
                logger.warning("%s; falling back to the previous checkpoint", err)
            first_error = first_error or err
    if first_error is not None:
        raise CheckpointError(f"{first_error}; no intact checkpoint to fall back to (--overwrite-output-dir starts "
                              f"again)")
    return None


def save_checkpoint(accelerator, output_dir: str | os.PathLike, step: int, state: TrainState,
                    export_model: Callable[[Path], None], save_total_limit: int = 0, sharded=None) -> Path:
    """Every process calls this (Accelerate saves its RNG state; `sharded`: a sharded run's (model, optimizer), its
    shard into STATE_DIR/SHARDED_DIR) and `export_model(dir)` (a collective export). Returns the final path. A
    failure to write (a full disk ...) removes the partial `checkpoint-<step>.tmp` and raises one CheckpointError
    naming the checkpoint, on every process; any other exception removes it too."""
    out = Path(output_dir)
    final = out / f"checkpoint-{step}"
    tmp = out / f"checkpoint-{step}.tmp"

    def failed(error) -> CheckpointError:
        reason = error if isinstance(error, str) else write_error(final, error)
        return CheckpointError(f"saving checkpoint-{step} failed: {reason}; the previous checkpoint is intact: "
                               f"{latest_checkpoint(out) or 'none yet'}")

    error = None
    try:
        try:
            if distributed.is_main():
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
        except OSError as err:
            error = err
        distributed.barrier()
        try:
            if error is None:
                accelerator.save_state(str(tmp / STATE_DIR), safe_serialization=True)
                if sharded is not None:
                    save_sharded(*sharded, tmp / STATE_DIR / SHARDED_DIR)
        except Exception as err:
            if not is_write_failure(err):
                raise
            error = err
        if any(distributed.all_gather_object(error is not None)):  # also: every process's files are written
            raise failed(error or "a write failed on another process")
        try:
            export_model(tmp)  # collective: every process takes part, the main one writes, a failure raises on all
        except Exception as err:
            if not is_write_failure(err):
                raise
            raise failed(err) from None

        def complete() -> None:
            state.files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
            (tmp / STATE_FILE).write_text(state.to_json())  # last: marks it complete
            fsync_tree(tmp)
            replace(tmp, final)
            if save_total_limit:
                for old in rotated_out(list_checkpoints(out), step, save_total_limit):
                    shutil.rmtree(old, ignore_errors=True)

        try:
            distributed.run_on_main(complete)
        except OSError as err:
            raise failed(err) from None
    except BaseException:
        if distributed.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def rotated_out(checkpoints: list[Path], step: int, keep: int) -> list[Path]:
    """Which checkpoints --save-total-limit removes after checkpoint-<step> was saved: never that one; first
    those of steps after it (left by a run that was resumed from an older checkpoint: an abandoned branch,
    redone by this run), then the oldest."""
    def number(p: Path) -> int:
        return int(_CKPT.match(p.name).group(1))

    others = [p for p in checkpoints if number(p) != step]
    order = [p for p in others if number(p) > step] + [p for p in others if number(p) < step]
    return order[: max(0, len(checkpoints) - keep)]


def load_checkpoint(accelerator, checkpoint: str | os.PathLike, sharded=None) -> None:
    """Restore model, optimizer, scaler and RNG states (tensors loaded with weights_only=True); sharded:
    (model, optimizer) of a sharded run, from STATE_DIR/SHARDED_DIR (collective)."""
    try:
        accelerator.load_state(str(Path(checkpoint) / STATE_DIR), load_kwargs={"weights_only": True})
        if sharded is not None:
            load_sharded(*sharded, Path(checkpoint) / STATE_DIR / SHARDED_DIR)
    except Exception as err:  # a damaged file that kept its size (older checkpoints list no sizes)
        raise CheckpointError(f"resume={str(checkpoint)!r}: cannot load {STATE_DIR}/ "
                              f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
