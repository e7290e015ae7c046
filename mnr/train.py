"""The training loop: data -> batch -> encoder -> loss -> step, with eval, logging and checkpoints.

`run(config)` is all of training: `setup(config)` builds one `Trainer` object, `train(trainer)` is the loop,
`finish(trainer)` evaluates and exports. `train_mnr.py` only parses the command line into a TrainConfig.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mnr import distributed, sharding
from mnr.batching import Collator, GlobalBatchSampler, make_loader
from mnr.atomic import atomic_dir, staged_into
from mnr.card import EMBEDDED_TRAIN_DATA
from mnr.checkpoint import (CheckpointError, TrainState, latest_checkpoint, load_checkpoint, newest_intact_checkpoint,
                            read_state, run_identity, save_checkpoint)
from mnr.cli import check_fits, check_prompt_room
from mnr.config import EMBEDDED_EVAL, EMBEDDED_TRAIN, TrainConfig
from mnr.data import DataError, check_sources, split_specs
from mnr.evaluate import Evaluator, build_evaluators, metric_choices
from mnr.gradcache import cached_loss_and_backward
from mnr.launch import LaunchError, make_accelerator
from mnr.lora import LoraSettings
from mnr.loss import no_gather
from mnr.matryoshka import label, record_dims
from mnr.backbone import Backbone
from mnr.model import ModelError, nonfinite_weights, resolve_model_path
from mnr.objectives import Objective, Rows, objective_from_config
from mnr.reporting import LogWindow, MetricsLog, Progress, Stopped, StopRequest, plural, setup_logging
from mnr.rundir import OutputDirError, mark_finished, open_output_dir, release_locks, write_marker
from mnr.store import Prompts, Team, prepare_train_store
from mnr.store import per_source as per_source_prompts

logger = logging.getLogger("mnr")
MAX_SKIPPED_SHARE = 0.25  # --skip-nonfinite: stop once more than this share of the run's steps was skipped


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, bad output dir ...); the message says where and why."""


# OSError: a file or disk problem of the user's environment (permissions, a full disk), reported the same way
USER_ERRORS = (ValueError, DataError, ModelError, CheckpointError, TrainingError, LaunchError, OutputDirError, OSError)


@dataclass
class Trainer:
    """Everything the loop touches, built once by `setup`."""

    cfg: TrainConfig
    accelerator: Any
    model: torch.nn.Module  # prepared by Accelerate (DDP-wrapped under several processes), or sharded (FSDP2)
    backbone: Backbone  # the model's owner: tokenisation policy, pooling, collective export
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR  # stepped per global step by us, not by Accelerate
    sampler: GlobalBatchSampler
    collator: Collator
    evaluators: list[Evaluator]  # every --eval-data set; called on every process
    best_metric: str  # "evaluator/metric" that picks best/
    metrics: MetricsLog
    state: TrainState
    out: Path
    total_steps: int
    warmup_steps: int  # of the learning-rate schedule
    examples: int
    data_stats: str  # what happened to every row read (kept / skipped, by reason)
    gather: bool  # score against the candidates of every process
    objective: Objective  # the loss of one global step's embeddings (mnr/objectives.py)
    k: int = 0  # hard negatives per query (0: pairs)
    stop: StopRequest = field(default_factory=StopRequest)
    progress: Progress | None = None
    window: LogWindow = field(default_factory=LogWindow)  # the steps since the last log line
    lr: float = 0.0  # the rate the last optimizer step used (logged)
    eval_info: str = ""  # the last evaluation's main metrics, shown on the progress line
    summary: dict = field(default_factory=dict)
    sharded: bool = False  # the model is sharded by mnr.sharding (FSDP2), not prepared by Accelerate

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.world

    @property
    def negatives_per_anchor(self) -> int:
        return (self.global_batch if self.gather else self.cfg.batch_size) * (self.n_roles - 1) - 1

    @property
    def n_roles(self) -> int:
        """Texts per example: anchor, positive and k negatives."""
        return 2 + self.k


# ---------------------------------------------------------------------------------------------
# run = setup; train; finish


def run(cfg: TrainConfig) -> dict:
    """Train as configured; returns a summary (scores, steps, paths). Raises a USER_ERRORS type on bad input.
    A stop signal (SIGTERM, Ctrl-C, SIGHUP) is heard from the start to the export: before training it stops at
    once (nothing to save), later at the next safe point, after saving (see StopRequest)."""
    t = None
    stop = StopRequest()
    stop.install()
    try:
        try:
            t = setup(cfg)
            t.stop = stop
            if t.state.global_step == 0 and not t.state.metrics_before:
                t.state.metrics_before = _evaluate_and_log(t, "before training")
            t.summary["metrics_before"] = t.state.metrics_before
        except Stopped as stopped:
            return _stopped_at_once(Path(cfg.output_dir), stopped, "before training started")
        stop.at_once = False
        t.progress = Progress(cfg.progress, t.total_steps, t.state.global_step)
        try:
            completed = train(t)
        finally:
            t.progress.close()
        return finish(t) if completed else t.summary
    except Stopped as stopped:  # a second signal
        return _stopped_at_once(Path(cfg.output_dir), stopped, "again")
    finally:
        stop.restore()
        release_locks()  # the output dir's lock, however the run ended
        if t is not None:
            close(t)


def close(t: Trainer) -> None:
    """End the trackers and the process group, however the run ended (finished, stopped by a signal, failed).

    The DDP-wrapped model, the optimizer and the scheduler are released first, while the interpreter is whole:
    DDP's last gloo work objects, destroyed only during interpreter shutdown, abort the process now and then
    (SIGABRT, "terminate called without an active exception") after a run that succeeded."""
    t.accelerator.free_memory()
    t.model = t.optimizer = t.scheduler = None
    gc.collect()
    t.accelerator.end_training()


def train(t: Trainer) -> bool:
    """The loop. Returns False when a stop signal ended it early (the state is saved then)."""
    cfg, st = t.cfg, t.state
    t.model.train()
    t.window.reset()
    t.lr = t.scheduler.get_last_lr()[0]
    while st.global_step < t.total_steps:
        for batch in make_loader(t.sampler, t.collator, st.epoch, st.step_in_epoch):
            # forward and backward
            loss = train_step(t, batch)
            clip = sharding.clip_grad_norm_ if t.sharded else t.accelerator.clip_grad_norm_
            grad_norm = clip(t.model.parameters(), cfg.max_grad_norm or float("inf"))
            # check: a non-finite loss or gradient, or a stop signal, on any process (all agree)
            bad_step, stop_now = _check_step(loss, grad_norm, t.stop.signum)
            # step
            if bad_step:
                _skip_step(t, batch)
            else:
                t.lr = t.scheduler.get_last_lr()[0]  # the rate this step uses
                t.optimizer.step()
                t.scheduler.step()
            t.optimizer.zero_grad(set_to_none=True)
            st.global_step += 1
            st.step_in_epoch += 1
            t.window.add(None if bad_step else loss.detach(), t.global_batch)
            # log
            if st.global_step % cfg.log_steps == 0 or st.global_step == t.total_steps:
                _log_step(t, loss, grad_norm)
                t.window.reset()
            else:
                t.progress.update(1)
            # evaluate
            if cfg.eval_steps and st.global_step % cfg.eval_steps == 0 and st.global_step < t.total_steps:
                _eval_and_keep_best(t)
            # save
            if stop_now or (cfg.save_steps and st.global_step % cfg.save_steps == 0):
                path = save(t)
                t.window.restart_clock()
            # stop
            if stop_now:
                _report_stop(t, path)
                return False
            if st.global_step >= t.total_steps:
                break
        else:
            st.epoch += 1
            st.step_in_epoch = 0
    return True


def train_step(t: Trainer, batch: dict) -> torch.Tensor:
    """Forward and backward of one global step on this process's rows; returns the (local) loss."""
    input_ids = batch["input_ids"].to(t.accelerator.device, non_blocking=True)
    attention_mask = batch["attention_mask"].to(t.accelerator.device, non_blocking=True)
    rows = Rows.of_batch(batch, t.n_roles, t.accelerator.device)
    gather, rank = (distributed.all_gather_with_grad, distributed.rank()) if t.gather else (no_gather, 0)

    def loss_of(embeddings: torch.Tensor) -> torch.Tensor:
        return t.objective(embeddings, rows, gather, rank)

    prompts = batch.get("prompt_lengths")  # include_prompt: false: the prompt tokens each row's pooling leaves out
    prompts = None if prompts is None else prompts.to(t.accelerator.device, non_blocking=True)
    if t.cfg.mini_batch_size:  # GradCache: chunks of mini_batch_size rows, the gradient of the whole batch
        return cached_loss_and_backward(t.model, input_ids, attention_mask, t.cfg.mini_batch_size, loss_of,
                                        t.accelerator.backward, None if t.sharded else t.accelerator.no_sync, prompts)
    loss = loss_of(t.model(input_ids, attention_mask, *([] if prompts is None else [prompts])))  # all roles at once
    t.accelerator.backward(loss)
    return loss


def finish(t: Trainer) -> dict:
    """Final evaluation, best/ and the exported model; returns the run's summary. A stop signal during the
    evaluation saves the trained state (a resume finishes from there); one during the export lets it end."""
    after = _evaluate_and_log(t, "after training")
    if _stop_agreed(t):
        if after:  # the resume redoes this evaluation and logs it: once in metrics.jsonl
            t.metrics.drop_last()
        _report_stop(t, _final_checkpoint(t), "during the final evaluation")
        return t.summary
    bad = _nonfinite(t)
    if bad:
        raise TrainingError(f"not exported: {len(bad)} weight tensors hold NaN or inf after step {t.state.global_step} "
                            f"(first: {bad[0]}); start again with a lower --lr")
    if after and t.cfg.eval_steps:
        _keep_best(t, after)
    _export_final(t, after)  # every process: the export is collective
    st = t.state
    t.summary.update(metrics_after=after, steps=st.global_step, skipped_steps=st.skipped_steps,
                     steps_per_source=t.sampler.steps_by_source(st.epoch, st.step_in_epoch),
                     best_metric=t.best_metric, best_score=st.best_score)
    t.accelerator.print(f"model saved to {t.out} ({plural(st.global_step, 'step')})")
    if _stop_agreed(t):
        t.accelerator.print(f"{_signal_name(t)} received during the export: the export completed, the run is "
                            f"finished")
    return t.summary


def _export_final(t: Trainer, scores: dict[str, float]) -> None:
    """The final model, written aside and moved into the output dir once whole; then mnr_run.json says finished
    (every process calls it: the export is collective)."""
    export(t, t.out, scores, stage=lambda: staged_into(t.out))
    distributed.run_on_main(lambda: mark_finished(t.out))


def _stop_agreed(t: Trainer) -> bool:
    """Whether any process got a stop signal (all processes call it and get the same answer)."""
    return distributed.any_true(torch.tensor([float(t.stop.signum > 0)], device=t.accelerator.device))[0]


def _final_checkpoint(t: Trainer) -> Path:
    """A checkpoint of the last step: the one saved at it (complete), else a new one."""
    step = t.state.global_step
    saved = distributed.run_on_main(lambda: str(latest_checkpoint(t.out) or ""), share=True)
    return Path(saved) if saved and Path(saved).name == f"checkpoint-{step}" else save(t)


def _stopped_at_once(out: Path, stopped: Stopped, when: str) -> dict:
    """The line of a run that a signal stopped where nothing could be saved; the summary says interrupted."""
    newest = latest_checkpoint(out)
    saved = (f"the newest checkpoint is {newest}; resume with the same command plus --resume auto" if newest
             else "nothing was saved; run the same command again")
    if distributed.launched_rank() == 0:
        print(f"{stopped.name} received {when}: stopped at once; {saved}.", flush=True)
    return {"interrupted": stopped.signum}


# ---------------------------------------------------------------------------------------------
# set-up


def setup(cfg: TrainConfig) -> Trainer:
    """Accelerator, output dir, model, data, optimizer, resume: everything checked before the first step."""
    from accelerate.utils import set_seed

    accelerator, report_to = make_accelerator(cfg)
    setup_logging(distributed.is_main())
    model_path, train_spec = resolve_model_path(cfg.model), cfg.train_data or str(EMBEDDED_TRAIN)
    _check_data(cfg, train_spec)
    # hashed once, by the main process (the data files are read whole), and shared with the others
    objective = objective_from_config(cfg)
    identity = distributed.run_on_main(lambda: run_identity(cfg, accelerator.num_processes, model_path, train_spec,
                                                            cfg.eval_data or str(EMBEDDED_EVAL), objective), share=True)
    out = prepare_output_dir(cfg, model_path, identity)
    resume_from = _find_resume(cfg, out)
    set_seed(cfg.seed)
    backbone = _setup_model(cfg, model_path)
    encoder, policy = backbone.encoder, backbone.policy
    prompts = (policy.query_prompt, policy.document_prompt)
    prompts = cfg.prompts_per_source(*prompts) or prompts  # --source-prompts: each source's own, in training
    sampler, collator, examples, data_stats = _setup_data(cfg, train_spec, policy, accelerator, prompts)
    k = collator.k or 0
    evaluators, best_metric = _setup_evaluators(cfg, getattr(encoder.config, "hidden_size", None))
    # an epoch without a single duplicate-free global batch is the sampler's error (it never yields zero steps)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else sampler.total_steps(cfg.epochs)
    warmup_steps = math.ceil(cfg.warmup_ratio * total_steps)
    if cannot_move := schedule_warning(total_steps, warmup_steps):
        logger.warning("%s", cannot_move)
    model, optimizer, scheduler, sharded = _model_and_optimizer(cfg, accelerator, encoder, total_steps, warmup_steps)
    collator.compact = not sharded  # sharded: the same rows, hence the same forwards, on every process
    backbone.attach(model)
    if distributed.is_main() and report_to != "none":
        accelerator.init_trackers("mnr", config={k: v for k, v in cfg.to_dict().items() if v is not None})
    world = accelerator.num_processes
    t = Trainer(cfg=cfg, accelerator=accelerator, model=model, backbone=backbone, optimizer=optimizer,
                scheduler=scheduler, sampler=sampler, collator=collator, evaluators=evaluators, best_metric=best_metric,
                metrics=MetricsLog(accelerator, out / "metrics.jsonl"), state=TrainState(run_identity=identity),
                out=out, total_steps=total_steps, warmup_steps=warmup_steps, examples=examples, data_stats=data_stats,
                k=k, gather=cfg.gather_negatives if cfg.gather_negatives is not None else world > 1,
                objective=objective, sharded=sharded)
    if resume_from is not None:
        t.state = _resume(t, *resume_from)
    t.metrics.truncate_after(t.state.global_step if resume_from else -1)  # records a resume redoes, or all
    if distributed.is_main():
        write_marker(out, identity, cfg.to_dict(), world)
    left_over = examples - sampler.steps_in_epoch(0) * t.global_batch
    logger.info("%s -> %s of %d per epoch (%d wait%s for the next epoch's reshuffle); %s; %s x %d; %s%s",
                plural(examples, "example"), plural(sampler.steps_in_epoch(0), "global batch", "global batches"),
                t.global_batch, left_over, "s" if left_over == 1 else "", plural(total_steps, "step"),
                plural(world, "process", "processes"), cfg.batch_size,
                plural(t.negatives_per_anchor, "negative per anchor", "negatives per anchor"),
                " (gathered from all processes)" if t.gather and world > 1 else "")
    t.summary = {"output_dir": str(out), "total_steps": total_steps, "examples": examples,
                 "global_batch_size": t.global_batch, "negatives_per_anchor": t.negatives_per_anchor}
    return t


def _check_data(cfg: TrainConfig, train_spec: str) -> None:
    """A missing data file is named before the output dir, the model and the token store are touched; when the
    output dir holds a run of it, the way back is to put the file where that run had it."""
    try:
        check_sources(split_specs(train_spec))
        check_sources(cfg.eval_data.split(","), folders=True)
    except DataError as err:
        if str(err).endswith(": no such file") and (Path(cfg.output_dir) / "mnr_run.json").is_file():
            raise DataError(f"{err} (moved or deleted?); output_dir={cfg.output_dir!r} holds a run of it: put the "
                            f"file back to resume that run") from None
        raise


def _model_and_optimizer(cfg: TrainConfig, accelerator, encoder: torch.nn.Module, total_steps: int,
                         warmup_steps: int) -> tuple[torch.nn.Module, Any, torch.optim.lr_scheduler.LambdaLR, bool]:
    """(model, optimizer, scheduler, sharded): the encoder sharded (FSDP2, `_shard`) or prepared by Accelerate
    (DDP under several processes), and AdamW over its parameters (the sharded ones when sharded)."""
    sharded = _shard(accelerator, encoder)  # before the optimizer: it holds the sharded parameters
    optimizer = torch.optim.AdamW(param_groups(encoder, cfg.weight_decay), lr=cfg.lr)
    # Not passed to prepare(): Accelerate would step it once per process; we count global steps ourselves.
    # Its state goes into trainer_state.json, not register_for_checkpointing: Accelerate unpickles custom
    # objects with weights_only=False, and resume state must load with weights_only=True.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(total_steps, warmup_steps))
    # sharded: neither goes through prepare() (it would shard again, or wrap in DDP); checkpoints save both
    model, optimizer = (encoder, optimizer) if sharded else accelerator.prepare(encoder, optimizer)
    return model, optimizer, scheduler, sharded


def _shard(accelerator, encoder: torch.nn.Module) -> bool:
    """Shard the encoder in place as Accelerate's FSDP2 plugin would (mnr.sharding), under an FSDP launch, or on
    the CPU under a multi-process launch with MNR_FSDP_CPU=1; whether it did."""
    fsdp = "FSDP" in str(accelerator.distributed_type)
    if not fsdp and not (sharding.cpu_sharding_requested() and accelerator.num_processes > 1):
        return False
    encoder.to(accelerator.device)
    policy = sharding.mixed_precision_policy(accelerator.mixed_precision)
    sharding.shard_model(encoder, **sharding.plan_from_env(), mp_policy=policy)
    logger.info("model sharded over %d processes (FSDP2, one unit per %s)", accelerator.num_processes,
                "/".join(sharding.layer_class_names(encoder)) or "model")
    return True


def _nonfinite(t: Trainer) -> list[str]:
    """Names of the parameters holding NaN or inf, the same on every process (sharded: collective)."""
    if t.sharded:
        return sharding.nonfinite_parameters(t.model)
    return nonfinite_weights(t.accelerator.unwrap_model(t.model))


def _setup_model(cfg: TrainConfig, model_path: str) -> Backbone:
    backbone = Backbone.load(model_path, cfg.max_seq_length, cfg.trust_remote_code, pooling=cfg.pooling,
                             query_prompt=cfg.query_prompt, document_prompt=cfg.document_prompt,
                             length_buckets=cfg.length_buckets, bidirectional=cfg.bidirectional,
                             include_prompt=cfg.include_prompt)
    backbone.save_dtype, backbone.save_adapter = cfg.save_dtype or None, cfg.save_adapter
    lora = (LoraSettings(cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules)
            if cfg.lora_r and not cfg.lora_adapter else None)
    if line := backbone.adapt(lora, cfg.lora_adapter, cfg.gradient_checkpointing):
        logger.info("%s", line)
    encoder = backbone.encoder
    check_fits(cfg.max_seq_length, encoder, "max_seq_length")
    width = getattr(encoder.config, "hidden_size", None)
    if width is not None and cfg.dims and max(cfg.dims) > width:
        raise TrainingError(f"matryoshka_dims={cfg.matryoshka_dims!r} is invalid: the model's embeddings have "
                            f"{width} dimensions")
    if width is not None and cfg.evaluation_dims and max(cfg.evaluation_dims) > width:
        raise TrainingError(f"eval_dims={cfg.eval_dims or cfg.matryoshka_dims!r} is invalid: the model's embeddings "
                            f"have {width} dimensions")
    return backbone


def _setup_data(cfg: TrainConfig, train_spec: str, policy, accelerator, prompts: Prompts = ("", "")
                ) -> tuple[GlobalBatchSampler, Collator, int, str]:
    """Sources -> the memory-mapped token store (built once per filesystem) -> this process's sampler, collator."""
    # Every process takes part: one store per filesystem, tokenised by the machines that share it (a failure
    # stops every process with its message).
    team = Team(distributed.rank(), accelerator.is_local_main_process, distributed.all_gather_object)
    sources = list(cfg.sources) or [train_spec]
    check_prompt_room(policy, per_source_prompts(prompts, len(sources)), "max_seq_length")
    data = prepare_train_store(sources, policy, cfg.max_seq_length, cfg.hard_negatives, cfg.cache_dir, prompts, team)
    logger.info("train data %s: %s", train_spec, data.stats.summary())
    k, masked, line = negatives_plan(cfg, data.max_negatives, data.negatives_per_example(), data.sources,
                                     data.source_names)
    logger.info("%s", line)
    per_source = not cfg.mix_sources and len(data.source_names) > 1
    sampler = GlobalBatchSampler(data.same_text_ids(), cfg.batch_size, accelerator.num_processes, distributed.rank(),
                                 cfg.seed, data.lengths, cfg.length_grouping, data.sources if per_source else None,
                                 cfg.weights, cfg.source_sampling, data.source_names)
    if len(data.source_names) > 1:
        logger.info("%s", sources_line(cfg, sampler, data.sources, data.source_names))
    left_out = None if policy.include_prompt else [
        [policy.prompt_length(p) for p in pair] for pair in per_source_prompts(prompts, len(sources))]
    collator = Collator(data.token_ids, data.text_ids, policy.pad_token_id, k, masked, cfg.seed, policy.padding_side,
                        left_out, data.sources)
    return sampler, collator, len(data), data.stats.summary()


def negatives_plan(cfg: TrainConfig, widest: int, per_example, sources, names: list[str]) -> tuple[int, bool, str]:
    """(k, whether some example has fewer than k, the start-up log line) from what the store holds."""
    mode = {None: "auto", True: "--hard-negatives", False: "--no-hard-negatives"}[cfg.hard_negatives]
    if widest == 0:
        why = "--no-hard-negatives" if cfg.hard_negatives is False else "auto: the data has no negatives"
        return 0, False, f"hard negatives: none, training on pairs ({why})"
    k = widest if cfg.k_negatives is None else cfg.k_negatives
    if k > widest:
        raise DataError(f"negatives_per_query={cfg.negatives_per_query!r} is more than any example has (at most "
                        f"{widest}): lower --negatives-per-query or pass 'all'")
    per_example = np.asarray(per_example)
    fewer = int((per_example < k).sum())
    line = f"hard negatives: {k} per query ({mode}: the data has them, at most {widest} per example)"
    if fewer:
        line += (f"; {fewer} of {len(per_example)} examples have fewer than {k} and use the ones they have "
                 f"(the empty slots are left out of the loss)")
    none = [n for s, n in enumerate(names) if not per_example[np.asarray(sources) == s].any()]
    if none:
        line += f"; no negatives in {', '.join(none)} (in-batch negatives only)"
    return k, fewer > 0, line


def sources_line(cfg: TrainConfig, sampler: GlobalBatchSampler, sources, names: list[str]) -> str:
    """The start-up line of several sources: examples and steps of each in the first epoch."""
    examples = np.bincount(np.asarray(sources), minlength=len(names))
    steps = sampler.batch_sources(0)
    if steps is None:
        return "sources mixed in every batch (--mix-sources): " + ", ".join(
            f"{n} {e} examples" for n, e in zip(names, examples))
    steps = np.bincount(steps, minlength=len(names))
    return (f"sources: one per global batch ({cfg.source_sampling}" + (f", weights {cfg.weights}" if cfg.weights
            else "") + "): " + ", ".join(f"{n} {e} examples, {s} steps/epoch" for n, e, s in
                                         zip(names, examples, steps)))


def _setup_evaluators(cfg: TrainConfig, width: int | None = None) -> tuple[list[Evaluator], str]:
    """The evaluators of --eval-data (each named in the log, each scoring the --eval-dims sizes below the model's
    width too) and the metric that picks best/."""
    dims = tuple(d for d in cfg.evaluation_dims if width is None or d < width)
    evaluators = build_evaluators(cfg.eval_data, cfg.max_seq_length, dims=tuple(sorted(set(dims), reverse=True)))
    for ev in evaluators:
        logger.info("evaluation: %s", ev.describe())
    if not evaluators:
        if cfg.metric_for_best:
            raise TrainingError(f"metric_for_best={cfg.metric_for_best!r} needs evaluation data (--eval-data is none)")
        return evaluators, ""
    choices = metric_choices(evaluators)
    chosen = cfg.metric_for_best or choices[0]
    if "/" not in chosen:  # an evaluator's name alone: its main metric
        chosen = next((c for c in choices if c.split("/", 1)[0] == chosen), chosen)
    if chosen not in choices:
        raise TrainingError(f"metric_for_best={cfg.metric_for_best!r} is not a metric of --eval-data; choose one of "
                            f"{', '.join(choices)}")
    return evaluators, chosen


def linear_schedule(total_steps: int, warmup_steps: int):
    """LR factor for optimizer step s (0-based): linear 0 -> 1 over warmup_steps, then linear to 0 at
    total_steps (the schedule spans the *total* steps, warm-up included)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def lr_steps(optimizer_steps: int, warmup_steps: int) -> int:
    """How many of a run's first `optimizer_steps` optimizer steps have lr > 0 under `linear_schedule`: all but
    the first when there is a warm-up (its factor is 0 / warmup_steps); the last step's factor is never 0."""
    return max(0, optimizer_steps - (1 if warmup_steps > 0 else 0))


def schedule_warning(total_steps: int, warmup_steps: int) -> str | None:
    """The start-up warning of a run whose optimizer cannot move the weights (no step at lr > 0); else None."""
    if lr_steps(total_steps, warmup_steps) > 0:
        return None
    return (f"this run cannot change the weights: {plural(total_steps, 'optimizer step')} with a warm-up of "
            f"{plural(warmup_steps, 'step')}, and the linear warm-up gives the first step learning rate 0; the "
            f"model will be saved as it was loaded. Train more steps (more data, --epochs or --max-steps, a smaller "
            f"--batch-size) or pass --warmup-ratio 0")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def prepare_output_dir(cfg: TrainConfig, model_path: str, identity: dict) -> Path:
    """Lock and check the output dir before any work (see mnr/rundir.py); a refusal stops every process.
    The run's inputs (data files, cache dir, model, checkpoint) are never moved aside by --overwrite-output-dir."""
    out = Path(cfg.output_dir)
    sources = [*cfg.sources, *split_specs(cfg.eval_data or "")]
    keep = tuple(p for p in [*sources, cfg.cache_dir, model_path, cfg.resume if cfg.resume != "auto" else ""]
                 if p and os.path.exists(p))
    distributed.run_on_main(lambda: open_output_dir(out, model_path, identity, cfg.resume, cfg.overwrite_output_dir,
                                                    keep))
    return out


def _find_resume(cfg: TrainConfig, out: Path) -> tuple[Path, TrainState] | None:
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        found = newest_intact_checkpoint(out)
        if found is None:
            logger.info("--resume auto: no complete checkpoint in %s, starting from scratch", out)
        return found
    checkpoint, state = Path(cfg.resume), read_state(cfg.resume)  # fails early on a dir that is not a checkpoint
    if state.best_score is not None and checkpoint.resolve().parent != out.resolve():
        logger.info("resuming from %s into another output dir: its best/ (score %s) stays in %s; the best score "
                    "starts again, the next evaluation writes %s", checkpoint, state.best_score,
                    checkpoint.resolve().parent, out / "best")
        state.best_score = None
    return checkpoint, state


def _resume(t: Trainer, checkpoint: Path, state: TrainState) -> TrainState:
    """The checkpoint's state, after checking it belongs to this run (see run_identity)."""
    state.check_same_run(t.state.run_identity, checkpoint)
    load_checkpoint(t.accelerator, checkpoint, (t.model, t.optimizer) if t.sharded else None)
    t.scheduler.load_state_dict({**state.scheduler, "lr_lambdas": [None] * len(t.scheduler.lr_lambdas)})
    logger.info("resumed from %s at step %d (epoch %d, batch %d)", checkpoint, state.global_step, state.epoch,
                state.step_in_epoch)
    return state


# ---------------------------------------------------------------------------------------------
# the loop's named stages


def _check_step(loss: torch.Tensor, grad_norm, signum: int) -> tuple[bool, bool]:
    """One host sync per step: is the loss/gradient non-finite here or anywhere, and did any process get a
    stop signal (all processes must agree, or one would wait forever in the next collective)."""
    grad_norm = torch.as_tensor(0.0 if grad_norm is None else grad_norm, device=loss.device)  # None: DeepSpeed
    flags = torch.stack([~torch.isfinite(loss.detach().float()), ~torch.isfinite(grad_norm.float()),
                         torch.tensor(signum > 0, device=loss.device)])
    bad_loss, bad_grad, stop = distributed.any_true(flags)
    return bad_loss or bad_grad, stop


def _skip_step(t: Trainer, batch: dict) -> None:
    """A non-finite step: stop with where it happened, or (--skip-nonfinite) count and log it."""
    st = t.state
    st.skipped_steps += 1
    where = f"step {st.global_step + 1} (epoch {st.epoch}, batch {st.step_in_epoch})"
    if not t.cfg.skip_nonfinite:
        raise TrainingError(f"non-finite loss or gradient at {where}; example indices of this process's batch: "
                            f"{batch['example_indices'].tolist()}; pass --skip-nonfinite to skip such steps")
    logger.warning("skipping %s: non-finite loss or gradient (examples %s); %d skipped so far", where,
                   batch["example_indices"].tolist(), st.skipped_steps)
    bad = _nonfinite(t)
    if bad:
        raise TrainingError(f"the weights hold NaN or inf at {where} ({len(bad)} tensors, first: {bad[0]}); "
                            f"skipping steps cannot recover: start again with a lower --lr")
    if st.skipped_steps > MAX_SKIPPED_SHARE * t.total_steps:
        raise TrainingError(f"{st.skipped_steps} of {t.total_steps} steps skipped by {where} (more than "
                            f"{MAX_SKIPPED_SHARE:.0%}): the run is not learning; lower --lr or check the data")


def _log_step(t: Trainer, loss: torch.Tensor, grad_norm) -> None:
    """One metrics record and progress line: the mean loss over the steps since the last log line (over all
    processes: the loss of the whole global batches, gathered negatives included) and the last step's."""
    window_loss = t.window.mean_loss()
    mean_loss = float("nan") if window_loss is None else float(distributed.mean(window_loss))
    record = {"step": t.state.global_step, "epoch": t.state.epoch, "loss": mean_loss,
              "loss_last_step": float(distributed.mean(loss.detach())), "lr": t.lr, "pairs_per_s": t.window.rate(),
              "grad_norm": None if grad_norm is None else float(grad_norm), "global_batch": t.global_batch,
              "negatives_per_anchor": t.negatives_per_anchor, "skipped_steps": t.state.skipped_steps}
    by_source = t.sampler.steps_by_source(t.state.epoch, t.state.step_in_epoch)
    if by_source is not None:
        record["steps_per_source"] = by_source
    t.metrics.write(record)
    info = (f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  {record['pairs_per_s']:.0f} pairs/s  "
            f"batch {t.global_batch} ({t.negatives_per_anchor} neg/anchor)" + (f"  {t.eval_info}" if t.eval_info else ""))
    t.progress.update(1, info=info)
    if not t.progress.live:  # no bar (a log file, CI): a plain line instead
        logger.info("step %d/%d  %s%s", t.state.global_step, t.total_steps, info, "" if by_source is None else
                    "  steps per source " + " ".join(f"{n}:{c}" for n, c in by_source.items()))


def evaluate(t: Trainer) -> dict[str, float]:
    """Every evaluator's metrics as {"evaluator/metric": value}. Every process calls it: the evaluators encode
    in shards and combine through mnr.distributed, so all processes get the same numbers (and none waits alone)."""
    return {key: value for ev in t.evaluators for key, value in ev.scores(t.backbone).items()}


def _evaluate_and_log(t: Trainer, when: str | None) -> dict[str, float]:
    scores = evaluate(t)
    if scores:
        t.metrics.write({"step": t.state.global_step, **scores})
        shown = "  ".join(f"{name} {_shown(name, value)}" for name, value in scores.items() if _is_main_metric(t, name))
        line = f"eval {when or f'at step {t.state.global_step}'}: {shown}"
        t.eval_info = f"| eval@{t.state.global_step}: {shown}"  # shown on the progress line until the next eval
        if when:
            t.accelerator.print(line)
        else:
            logger.info(line)
    return scores


def _is_main_metric(t: Trainer, name: str) -> bool:
    return any(name == f"{label(ev.name, dim)}/{ev.main_metric}" for ev in t.evaluators for dim in (None, *ev.dims))


def _shown(name: str, value: float) -> str:
    return f"{value:.2f}" if name.endswith("/spearman") else f"{value:.4f}"


def _eval_and_keep_best(t: Trainer) -> None:
    scores = _evaluate_and_log(t, None)
    if scores:
        _keep_best(t, scores)


def _keep_best(t: Trainer, scores: dict[str, float]) -> None:
    score = scores[t.best_metric]
    if math.isnan(score):  # constant similarities (a collapsed model): never "best"
        return
    st = t.state
    if st.best_score is None or score > st.best_score:
        st.best_score = score
        _export_best(t, scores)  # every process (collective); a failure stops every process
        logger.info("new best %s %s at step %d -> %s", t.best_metric, _shown(t.best_metric, score), st.global_step,
                    t.out / "best")


def _export_best(t: Trainer, scores: dict[str, float]) -> None:
    """best/ whole or absent: a kill or a full disk leaves the previous best/ (every process calls it)."""
    export(t, t.out / "best", scores, stage=lambda: atomic_dir(t.out / "best"))


def export(t: Trainer, path: Path, scores: dict[str, float] | None = None, into: Path | None = None,
           stage=None) -> None:
    """The model as it is now, in HF + sentence-transformers layout with a model card naming `path`: every process
    calls it (the backbone's export is collective), the main one writes, into `into` when given (a temporary dir
    that becomes `path`), or into the dir `stage()` yields (a context manager on the main process)."""
    cfg = t.cfg
    user_length = cfg.max_seq_length if "max_seq_length" in cfg.given else None
    t.backbone.export(into or path, user_length, card=_card_info(t, path, scores or {}), stage=stage,
                      then=lambda target: record_dims(target, cfg.dims))  # for `mnr.evaluate`, the card's truncate_dim


def _card_info(t: Trainer, path: Path, scores: dict[str, float]) -> dict:
    """The run's facts for the model card (schema in mnr/card.py)."""
    cfg = t.cfg
    settings = {**t.objective.describe(),  # the loss's rows: "loss" first
                "hard negatives": t.k > 0, "hard negatives per query": t.k, "batch size per process": cfg.batch_size,
                "processes": t.world, "global batch size": t.global_batch,
                "negatives per anchor": t.negatives_per_anchor, "learning rate": cfg.lr,
                "warm-up ratio": cfg.warmup_ratio, "weight decay": cfg.weight_decay,
                "max_seq_length (training)": cfg.max_seq_length, "epochs": cfg.epochs, "seed": cfg.seed}
    if cfg.mini_batch_size:
        settings["GradCache mini-batch"] = cfg.mini_batch_size
    settings.update(t.backbone.describe())  # adapter, checkpointing, attention, export dtype
    metrics: dict = {}
    for name in dict.fromkeys([*t.state.metrics_before, *scores]):
        evaluator, metric = name.split("/", 1)
        metrics.setdefault(evaluator, {})[metric] = {"before": t.state.metrics_before.get(name),
                                                     "after": scores.get(name), "scale": 100 if metric == "spearman" else 1}
    data = ({"datasets": list(cfg.sources), "train_data": cfg.train_data} if cfg.train_data
            else EMBEDDED_TRAIN_DATA)
    applied = t.state.global_step - t.state.skipped_steps  # optimizer steps taken (a skipped step takes none)
    return {**data, "matryoshka_dims": list(cfg.dims) or None,
            "weights_unchanged": lr_steps(applied, t.warmup_steps) == 0,
            "data_stats": t.data_stats, "examples": t.examples, "steps": t.state.global_step,
            "settings": settings, "metrics": metrics, "path": str(path)}


def save(t: Trainer) -> Path:
    """A resumable checkpoint of this step (every process takes part)."""
    t.state.scheduler = {k: v for k, v in t.scheduler.state_dict().items() if k != "lr_lambdas"}
    path = save_checkpoint(t.accelerator, t.out, t.state.global_step, t.state,
                           lambda tmp: export(t, tmp.with_name(tmp.name.removesuffix(".tmp")), into=tmp),
                           t.cfg.save_total_limit, (t.model, t.optimizer) if t.sharded else None)
    logger.info("saved checkpoint %s", path)
    return path


def _signal_name(t: Trainer) -> str:
    """The stop signal's name, the same on every process (one that got none takes another's)."""
    t.stop.signum = t.stop.signum or max(distributed.all_gather_object(t.stop.signum))
    return signal.Signals(t.stop.signum).name


def _report_stop(t: Trainer, path: Path, when: str = "") -> None:
    """The stop line (every process calls it); `when`: a stop after the last step, during the final evaluation."""
    name, step = _signal_name(t), t.state.global_step
    done = f" {when}: training is complete at step {step}" if when else f": stopped after step {step}"
    t.accelerator.print(f"{name} received{done}; state saved in {path}. "
                        f"Resume with the same command plus --resume auto (or --resume {path})"
                        f"{' to evaluate and export' if when else ''}.")
    t.summary["interrupted"] = t.stop.signum


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: parse, validate, train. Bad input -> one-line error and exit code 2
    (set MNR_DEBUG=1 for the traceback); a stop signal -> 128 + its number."""
    from mnr import cli
    from mnr.config import parse_config

    def body() -> int:
        summary = run(parse_config(argv))
        return 128 + int(summary["interrupted"]) if summary.get("interrupted") else 0

    return cli.run(body, USER_ERRORS)
