"""The training loop: data -> batch -> encoder -> loss -> step, with eval, logging and checkpoints.

`run(config)` is all of training; `train_mnr.py` only parses the command line into a TrainConfig.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mnr import distributed
from mnr.batching import Collator, GlobalBatchSampler, make_loader
from mnr.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, read_state, save_checkpoint
from mnr.config import EMBEDDED_EVAL, EMBEDDED_TRAIN, TrainConfig
from mnr.data import DataError
from mnr.evaluate import load_sts, sts_spearman
from mnr.gradcache import cached_loss_and_backward
from mnr.loss import mnr_loss, split_roles
from mnr.model import ModelError, load_encoder, max_positions, resolve_model_path, save_model
from mnr.store import prepare_train_store

logger = logging.getLogger("mnr")
RUN_MARKER = "mnr_run.json"  # the config and world size of the run that wrote this output dir


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, bad output dir ...); the message says where and why."""


USER_ERRORS = (ValueError, DataError, ModelError, CheckpointError, TrainingError)


# ---------------------------------------------------------------------------------------------
# helpers named in the loop


def linear_schedule(total_steps: int, warmup_steps: int):
    """LR factor for optimizer step s (0-based): linear 0 -> 1 over warmup_steps, then linear to 0 at
    total_steps (the schedule spans the *total* steps, warm-up included)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def prepare_output_dir(cfg: TrainConfig, is_main: bool) -> Path:
    """Refuse a foreign non-empty dir unless --overwrite-output-dir; check it is writable before training."""
    out = Path(cfg.output_dir)
    if is_main:
        if out.exists() and not out.is_dir():
            raise TrainingError(f"output_dir={cfg.output_dir!r} exists and is not a directory")
        if out.is_dir() and any(out.iterdir()) and not (cfg.overwrite_output_dir or cfg.resume):
            raise TrainingError(f"output_dir={cfg.output_dir!r} exists and is not empty; pass "
                                f"--overwrite-output-dir to write into it, or --resume auto to continue a run")
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".mnr_write_test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise TrainingError(f"output_dir={cfg.output_dir!r} is not writable ({err.strerror or err})") from None
    distributed.barrier()
    return out


class MetricsLog:
    """metrics.jsonl in the output dir (+ Accelerate trackers); rank 0 only."""

    def __init__(self, accelerator, path: Path):
        self.accelerator = accelerator
        self.path = path

    def truncate_after(self, step: int) -> None:
        """On resume: drop records of steps the crashed run did after its checkpoint (they are redone)."""
        if not self.accelerator.is_main_process or not self.path.is_file():
            return
        keep = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if not self.accelerator.is_main_process:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.accelerator.trackers:
            self.accelerator.log(numbers, step=record.get("step"))


class Progress:
    """Rich progress bar on rank 0 (loss, lr, pairs/s, ETA); a no-op elsewhere or when disabled."""

    def __init__(self, enabled: bool, total: int, completed: int):
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, \
                TimeElapsedColumn, TimeRemainingColumn

            self.bar = RichProgress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"),
                                    TimeRemainingColumn(), transient=False)
            self.task = self.bar.add_task("train", total=total, completed=completed, info="")
            self.bar.start()

    @property
    def live(self) -> bool:
        return self.bar is not None and self.bar.console.is_terminal

    def update(self, advance: int = 1, info: str | None = None) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=advance, **({"info": info} if info is not None else {}))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


class StopRequest:
    """SIGTERM / Ctrl-C: finish the current step, save, exit non-zero (second Ctrl-C kills at once)."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not in the main thread (e.g. a notebook worker): leave signals alone
                pass

    def _handle(self, signum, frame) -> None:
        if self.signum:  # second signal: give up now
            self.restore()
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


@dataclass
class Position:
    """Where training is: the resumable data position plus counters."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_score: float | None = None
    skipped_steps: int = 0
    stsb_before: float | None = None  # kept across a resume for the model card and summary


# ---------------------------------------------------------------------------------------------


def setup_logging(is_main: bool) -> None:
    level = logging.INFO if is_main else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger().setLevel(level)
    for noisy in ("transformers", "datasets", "httpx", "urllib3", "filelock", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def run(cfg: TrainConfig) -> dict:
    """Train as configured; returns a summary (scores, steps, paths). Raises a USER_ERRORS type on bad input."""
    from accelerate.utils import set_seed

    accelerator, report_to = _make_accelerator(cfg)
    setup_logging(accelerator.is_main_process)
    world, rank = accelerator.num_processes, accelerator.process_index
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and world != launched:  # N independent runs into one output dir would silently train N separate models
        raise TrainingError(f"the launcher started {launched} processes (WORLD_SIZE) but Accelerate set up "
                            f"{world} ({accelerator.distributed_type}); check the accelerate config")
    gather = cfg.gather_negatives if cfg.gather_negatives is not None else world > 1
    _check_backend(accelerator, cfg)
    out = prepare_output_dir(cfg, accelerator.is_main_process)
    resume_from = _find_resume(cfg, out)
    set_seed(cfg.seed)

    # ---- model and data ------------------------------------------------------------------
    model_path = resolve_model_path(cfg.model)
    encoder, tokenizer = load_encoder(model_path, cfg.trust_remote_code)
    encoder.length_buckets = cfg.length_buckets
    limit = max_positions(encoder)
    if limit is not None and cfg.max_seq_length > limit:
        raise TrainingError(f"max_seq_length={cfg.max_seq_length} exceeds the model's position limit ({limit} tokens)")
    train_spec = cfg.train_data or str(EMBEDDED_TRAIN)
    # one process per filesystem builds the memory-mapped token store (a file lock); the others wait and map it
    data = prepare_train_store(train_spec, tokenizer, cfg.max_seq_length, cfg.hard_negatives, cfg.cache_dir)
    logger.info("train data %s: %s", train_spec, data.stats.summary())
    eval_data = None
    if cfg.eval_data.lower() != "none":
        eval_data = load_sts(cfg.eval_data or str(EMBEDDED_EVAL))
    sampler = GlobalBatchSampler(data.text_ids, cfg.batch_size, world, rank, cfg.seed, data.lengths,
                                 cfg.length_grouping)
    collator = Collator(data.token_ids, data.text_ids, tokenizer.pad_token_id)
    steps_per_epoch = sampler.steps_in_epoch(0)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else sum(sampler.steps_in_epoch(e) for e in range(cfg.epochs))
    global_batch = cfg.batch_size * world
    negatives_per_anchor = (global_batch if gather else cfg.batch_size) * (cfg.n_roles - 1) - 1
    left_over = len(data) - steps_per_epoch * global_batch
    logger.info("%d examples -> %d global batches of %d per epoch (%d wait for the next epoch's reshuffle); "
                "%d steps; %d processes x %d; %d negatives per anchor%s", len(data), steps_per_epoch, global_batch,
                left_over, total_steps, world, cfg.batch_size, negatives_per_anchor,
                " (gathered from all processes)" if gather and world > 1 else "")

    # ---- optimisation --------------------------------------------------------------------
    optimizer = torch.optim.AdamW(param_groups(encoder, cfg.weight_decay), lr=cfg.lr)
    warmup_steps = math.ceil(cfg.warmup_ratio * total_steps)
    # Not passed to prepare(): Accelerate would step it once per process; we count global steps ourselves.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(total_steps, warmup_steps))
    model, optimizer = accelerator.prepare(encoder, optimizer)
    # The scheduler's state goes into trainer_state.json, not register_for_checkpointing: Accelerate unpickles
    # custom objects with weights_only=False, and resume state must load with weights_only=True.
    if accelerator.is_main_process and report_to != "none":
        accelerator.init_trackers("mnr", config={k: v for k, v in cfg.to_dict().items() if v is not None})

    pos = Position()
    if resume_from is not None:
        pos = _resume(accelerator, cfg, resume_from, world, scheduler)
    metrics = MetricsLog(accelerator, out / "metrics.jsonl")
    if resume_from is not None:
        metrics.truncate_after(pos.global_step)
    if accelerator.is_main_process:
        (out / RUN_MARKER).write_text(json.dumps({"config": cfg.to_dict(), "world_size": world}, indent=2))

    def loss_from_embeddings(embeddings: torch.Tensor) -> torch.Tensor:
        roles = split_roles(embeddings, cfg.n_roles)
        return mnr_loss(roles[0], roles[1], roles[2] if cfg.n_roles == 3 else None, scale=cfg.scale,
                        symmetric=cfg.symmetric, gather=distributed.all_gather_with_grad if gather else (lambda t: t),
                        rank=rank if gather else 0)

    def evaluate() -> float | None:
        score = None
        if eval_data is not None and accelerator.is_main_process:
            score = sts_spearman(accelerator.unwrap_model(model), tokenizer, eval_data, cfg.max_seq_length)
        # Every process gets rank 0's score (also a sync point): _keep_best runs, and syncs, on all of them;
        # a score on rank 0 only would leave rank 0 alone in its barrier while the others train on (a hang).
        return distributed.all_gather_object(score)[0]

    def export(path: Path, score: float | None = None) -> None:
        save_model(accelerator.unwrap_model(model), tokenizer, path, cfg.max_seq_length, card={
            "base_model": cfg.model or "all-MiniLM-L6-v2", "train_data": cfg.train_data or "embedded SNLI sample",
            "examples": len(data), "hard_negatives": cfg.hard_negatives, "steps": pos.global_step,
            "global_batch_size": global_batch, "lr": cfg.lr, "scale": cfg.scale, "stsb_before": summary.get("stsb_before"),
            "stsb_after": None if score is None else f"{score:.2f}", "eval_data": cfg.eval_data or "embedded STSb validation"})

    summary: dict = {"output_dir": str(out), "total_steps": total_steps, "examples": len(data),
                     "global_batch_size": global_batch, "negatives_per_anchor": negatives_per_anchor}
    if resume_from is None:
        summary["stsb_before"] = evaluate()
        if summary["stsb_before"] is not None:
            accelerator.print(f"STSb validation Spearman before training: {summary['stsb_before']:.2f}")
            metrics.write({"step": 0, "stsb_spearman": summary["stsb_before"]})
    else:
        summary["stsb_before"] = pos.stsb_before

    # ---- the loop ------------------------------------------------------------------------
    stop = StopRequest()
    stop.install()
    progress = Progress(cfg.progress and accelerator.is_main_process, total_steps, pos.global_step)
    model.train()
    t_last, pairs_since, lr = time.perf_counter(), 0, scheduler.get_last_lr()[0]
    try:
        while pos.global_step < total_steps:
            loader = make_loader(sampler, collator, pos.epoch, pos.step_in_epoch)
            for batch in loader:
                input_ids = batch["input_ids"].to(accelerator.device, non_blocking=True)
                attention_mask = batch["attention_mask"].to(accelerator.device, non_blocking=True)
                if cfg.mini_batch_size:
                    loss = cached_loss_and_backward(model, input_ids, attention_mask, cfg.mini_batch_size,
                                                    loss_from_embeddings, accelerator.backward, accelerator.no_sync)
                else:
                    loss = loss_from_embeddings(model(input_ids, attention_mask))  # one forward over all roles
                    accelerator.backward(loss)
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf"))
                bad_step, stop_now = _check_step(loss, grad_norm, stop.signum, world)
                if bad_step:
                    pos.skipped_steps += 1
                    where = f"step {pos.global_step + 1} (epoch {pos.epoch}, batch {pos.step_in_epoch})"
                    if not cfg.skip_nonfinite:
                        raise TrainingError(f"non-finite loss or gradient at {where}; example indices of this "
                                            f"process's batch: {batch['example_indices'].tolist()}; pass "
                                            f"--skip-nonfinite to skip such steps")
                    logger.warning("skipping %s: non-finite loss or gradient (examples %s); %d skipped so far",
                                   where, batch["example_indices"].tolist(), pos.skipped_steps)
                else:
                    lr = scheduler.get_last_lr()[0]  # the rate this step uses (logged below)
                    optimizer.step()
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                pos.global_step += 1
                pos.step_in_epoch += 1
                pairs_since += global_batch

                if pos.global_step % cfg.log_steps == 0 or pos.global_step == total_steps:
                    now = time.perf_counter()
                    # mean over processes = the loss of the whole global batch (with gathered negatives)
                    global_loss = float(accelerator.reduce(loss.detach(), "mean").item())
                    record = {"step": pos.global_step, "epoch": pos.epoch, "loss": global_loss,
                              "lr": lr, "pairs_per_s": pairs_since / (now - t_last),
                              "grad_norm": None if grad_norm is None else float(grad_norm), "global_batch": global_batch,
                              "negatives_per_anchor": negatives_per_anchor, "skipped_steps": pos.skipped_steps}
                    metrics.write(record)
                    info = (f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['pairs_per_s']:.0f} pairs/s  "
                            f"batch {global_batch} ({negatives_per_anchor} neg/anchor)")
                    progress.update(1, info=info)
                    if not progress.live:  # no terminal (a log file, CI): a plain line instead of a bar
                        logger.info("step %d/%d  %s", pos.global_step, total_steps, info)
                    t_last, pairs_since = time.perf_counter(), 0
                else:
                    progress.update(1)
                if cfg.eval_steps and pos.global_step % cfg.eval_steps == 0 and pos.global_step < total_steps:
                    _eval_and_keep_best(evaluate, export, metrics, pos, out)
                if stop_now or (cfg.save_steps and pos.global_step % cfg.save_steps == 0):
                    path = _save(accelerator, cfg, out, pos, world, summary, export, scheduler)
                    if stop_now:
                        name = signal.Signals(stop.signum).name
                        accelerator.print(f"{name} received: stopped after step {pos.global_step}; state saved "
                                          f"in {path}. Resume with the same command plus --resume auto "
                                          f"(or --resume {path}).")
                        summary["interrupted"] = stop.signum
                        return summary
                    t_last, pairs_since = time.perf_counter(), 0
                if pos.global_step >= total_steps:
                    break
            else:
                pos.epoch += 1
                pos.step_in_epoch = 0
    finally:
        progress.close()
        stop.restore()

    # ---- the end: final eval, model, summary ------------------------------------------------
    summary["stsb_after"] = evaluate()
    if summary["stsb_after"] is not None:
        metrics.write({"step": pos.global_step, "stsb_spearman": summary["stsb_after"]})
        if cfg.eval_steps:
            _keep_best(summary["stsb_after"], export, pos, out)
    if accelerator.is_main_process:
        export(out, summary["stsb_after"])
    distributed.barrier()
    summary.update(steps=pos.global_step, skipped_steps=pos.skipped_steps, best_stsb=pos.best_score)
    if summary["stsb_after"] is not None:
        before = summary["stsb_before"]
        accelerator.print(f"STSb validation Spearman after training: {summary['stsb_after']:.2f}"
                          + (f" (before: {before:.2f})" if before is not None else ""))
    accelerator.print(f"model saved to {out} ({pos.global_step} steps)")
    accelerator.end_training()
    return summary


def _make_accelerator(cfg: TrainConfig):
    """One Accelerator for the run (devices, DDP, precision come from the launch) and the tracker in use."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    report_to = cfg.report_to
    if report_to == "auto":
        from accelerate.utils import is_tensorboard_available

        report_to = "tensorboard" if is_tensorboard_available() else "none"
    accelerator = Accelerator(log_with=None if report_to == "none" else report_to, project_dir=cfg.output_dir,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
                              cpu=_launched_without_device())
    return accelerator, report_to


def _launched_without_device() -> bool:
    """A torchrun-style launch (`accelerate launch --multi_gpu --num_processes N`, WORLD_SIZE > 1) on a machine
    where Accelerate finds no GPU-like device: without cpu=True Accelerate would give every process world size 1
    (N independent runs); with it, the processes form one gloo group on the CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False
    from accelerate import PartialState

    if PartialState._shared_state:  # already set up (e.g. by a caller): keep it
        return False
    if PartialState().num_processes > 1:
        return False
    PartialState._reset_state()  # no process group was created: safe to set up again, on the CPU
    return True


def _check_backend(accelerator, cfg: TrainConfig) -> None:
    """Refuse, before any work, what would silently train wrong under FSDP or DeepSpeed.

    - GradCache runs several forwards/backwards per step; DeepSpeed steps the optimizer inside every
      accelerator.backward and FSDP has no equivalent of DDP's no_sync here.
    - FSDP and ZeRO-3 shard the parameters: the rank-0-only evaluation and export would see shards.
      (The all-gather of negatives is unaffected: it gathers activations, not parameters.)
    - DeepSpeed applies the optimizer step inside accelerator.backward, before the non-finite check.
    """
    kind = str(accelerator.distributed_type)
    if cfg.mini_batch_size and ("DEEPSPEED" in kind or "FSDP" in kind):
        raise TrainingError(f"--mini-batch-size (GradCache) is not supported under {kind}: its several forwards "
                            f"per step need DDP's no_sync; use multi-GPU DDP or drop --mini-batch-size")
    if "FSDP" in kind:
        raise TrainingError(f"distributed_type={kind} is not supported: FSDP shards the parameters, so the "
                            f"rank-0 evaluation and model export would see shards; use DDP "
                            f"(accelerate_configs/multi_gpu.yaml) or DeepSpeed ZeRO-2 "
                            f"(accelerate_configs/deepspeed_zero2.yaml)")
    if "DEEPSPEED" in kind:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        stage = ds.get("zero_optimization", {}).get("stage", 0)
        if stage not in (0, 1, 2):
            raise TrainingError(f"DeepSpeed zero_stage={stage} is not supported: ZeRO-3 shards the parameters, "
                                f"so the rank-0 evaluation and export would see shards; use zero_stage 1 or 2")
        if cfg.skip_nonfinite:
            raise TrainingError("--skip-nonfinite is not supported under DeepSpeed: DeepSpeed applies the "
                                "optimizer step inside backward, before mnr can check the loss")
        ds["train_micro_batch_size_per_gpu"] = cfg.batch_size  # no DataLoader goes through prepare()
        ds["gradient_accumulation_steps"] = 1
        ds["gradient_clipping"] = cfg.max_grad_norm  # DeepSpeed clips inside its own step (0: no clipping)


def _check_step(loss: torch.Tensor, grad_norm, signum: int, world: int) -> tuple[bool, bool]:
    """One host sync per step: is the loss/gradient non-finite here or anywhere, and did any process get a
    stop signal (all processes must agree, or one would wait forever in the next collective)."""
    flags = torch.stack([(~torch.isfinite(loss.detach().float())).float(),
                         (~torch.isfinite(torch.as_tensor(0.0 if grad_norm is None else grad_norm,  # None: DeepSpeed
                                                          device=loss.device).float())).float(),
                         torch.tensor(float(signum > 0), device=loss.device)])
    if world > 1:
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    bad_loss, bad_grad, stop = flags.tolist()
    return bool(bad_loss or bad_grad), bool(stop)


def _eval_and_keep_best(evaluate, export, metrics: MetricsLog, pos: Position, out: Path) -> None:
    score = evaluate()
    if score is not None:
        metrics.write({"step": pos.global_step, "stsb_spearman": score})
        _keep_best(score, export, pos, out)


def _keep_best(score: float, export, pos: Position, out: Path) -> None:
    if math.isnan(score):  # constant similarities (a collapsed model): never "best"
        return
    if pos.best_score is None or score > pos.best_score:
        pos.best_score = score
        if distributed.rank() == 0:
            export(out / "best", score)
            logger.info("new best STSb %.2f at step %d -> %s", score, pos.global_step, out / "best")
    distributed.barrier()


def _save(accelerator, cfg: TrainConfig, out: Path, pos: Position, world: int, summary: dict, export,
          scheduler) -> Path:
    state = {"epoch": pos.epoch, "step_in_epoch": pos.step_in_epoch, "global_step": pos.global_step,
             "best_score": pos.best_score, "skipped_steps": pos.skipped_steps, "world_size": world,
             "batch_size": cfg.batch_size, "seed": cfg.seed, "hard_negatives": cfg.hard_negatives,
             "length_grouping": cfg.length_grouping, "stsb_before": summary.get("stsb_before"),
             "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}}
    path = save_checkpoint(accelerator, out, pos.global_step, state, export, cfg.save_total_limit)
    logger.info("saved checkpoint %s", path)
    return path


def _find_resume(cfg: TrainConfig, out: Path) -> Path | None:
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        found = latest_checkpoint(out)
        if found is None:
            logger.info("--resume auto: no complete checkpoint in %s, starting from scratch", out)
        return found
    read_state(cfg.resume)  # fail early on a directory that is not a checkpoint
    return Path(cfg.resume)


def _resume(accelerator, cfg: TrainConfig, checkpoint: Path, world: int, scheduler) -> Position:
    """Decision: a resumed run must have the same world size, batch size, seed, pairs/triplets choice and
    length grouping, because the data order and every process's RNG stream are functions of them; a change
    stops with a clear message."""
    state = read_state(checkpoint)
    for key, now in (("world_size", world), ("batch_size", cfg.batch_size), ("seed", cfg.seed),
                     ("hard_negatives", cfg.hard_negatives), ("length_grouping", cfg.length_grouping)):
        if state.get(key) != now:
            raise CheckpointError(f"cannot resume from {checkpoint}: it was saved with {key}={state.get(key)!r}, "
                                  f"this run has {key}={now!r}; resume with the same setting (or start a new run)")
    load_checkpoint(accelerator, checkpoint)
    scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(scheduler.lr_lambdas)})
    logger.info("resumed from %s at step %d (epoch %d, batch %d)", checkpoint, state["global_step"],
                state["epoch"], state["step_in_epoch"])
    return Position(epoch=state["epoch"], step_in_epoch=state["step_in_epoch"], global_step=state["global_step"],
                    best_score=state.get("best_score"), skipped_steps=state.get("skipped_steps", 0),
                    stsb_before=state.get("stsb_before"))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: parse, validate, train. Bad input -> one-line error and exit code 2
    (set MNR_DEBUG=1 for the traceback)."""
    from mnr.config import parse_config

    try:
        cfg = parse_config(argv)
        summary = run(cfg)
    except USER_ERRORS as err:
        if os.environ.get("MNR_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    if summary.get("interrupted"):
        return 128 + int(summary["interrupted"])
    return 0
