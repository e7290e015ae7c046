"""Accelerate set-up: one Accelerator for the run, and the checks that refuse a launch that would train wrong."""

from __future__ import annotations

from mnr import distributed
from mnr.config import TrainConfig
from mnr.sharding import fsdp_launch_problem


class LaunchError(RuntimeError):
    """The launch (processes, backend, tracker) cannot train this config correctly; the message says why."""


def make_accelerator(cfg: TrainConfig):
    """(accelerator, tracker in use): devices, DDP and precision come from the launch; checked before any work."""
    from datetime import timedelta

    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    problem = fsdp_launch_problem()  # before Accelerate turns a GPU-less FSDP launch into N independent runs
    if problem:
        raise LaunchError(problem)
    report_to = resolve_tracker(cfg.report_to)
    accelerator = Accelerator(log_with=None if report_to == "none" else report_to, project_dir=cfg.output_dir,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False),
                                               InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.ddp_timeout))],
                              cpu=_launched_without_device())
    launched = distributed.launched_world_size()
    if launched > 1 and accelerator.num_processes != launched:
        # N independent runs into one output dir would silently train N separate models
        raise LaunchError(f"the launcher started {launched} processes (WORLD_SIZE) but Accelerate set up "
                          f"{accelerator.num_processes} ({accelerator.distributed_type}); check the accelerate config")
    check_backend(accelerator, cfg)
    return accelerator, report_to


def resolve_tracker(report_to: str) -> str:
    """The tracker Accelerate logs to ('none': none): 'auto' is tensorboard when installed, else none; a named
    tracker that is not installed, or 'all' with none installed, is a LaunchError saying what to install
    (Accelerate itself would only warn and train without one)."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    installed = {"tensorboard": is_tensorboard_available(), "wandb": is_wandb_available()}
    if report_to == "auto":
        return "tensorboard" if installed["tensorboard"] else "none"
    if report_to == "all" and not any(installed.values()):
        raise LaunchError("--report-to all: no tracker is installed; pip install tensorboard (or wandb), or pass "
                          "--report-to none")
    if report_to in installed and not installed[report_to]:
        raise LaunchError(f"--report-to {report_to}: the {report_to} package is not installed; pip install "
                          f"{report_to}, or pass --report-to none (or auto: tensorboard when installed)")
    return report_to


def _launched_without_device() -> bool:
    """A torchrun-style launch (`accelerate launch --multi_gpu --num_processes N`, WORLD_SIZE > 1) on a machine
    where Accelerate finds no GPU-like device: without cpu=True Accelerate would give every process world size 1
    (N independent runs); with it, the processes form one gloo group on the CPU."""
    if distributed.launched_world_size() < 2:
        return False
    from accelerate import PartialState

    if PartialState._shared_state:  # already set up (e.g. by a caller): keep it
        return False
    if PartialState().num_processes > 1:
        return False
    PartialState._reset_state()  # no process group was created: safe to set up again, on the CPU
    return True


def check_backend(accelerator, cfg: TrainConfig) -> None:
    """Refuse, before any work, what would silently train wrong under FSDP or DeepSpeed.

    - FSDP: version 2 only; mnr shards the model itself as Accelerate's FSDP2 plugin does (mnr.sharding), with
      a collective export, sharded checkpoints and GradCache (a reduce-scatter per chunk). Parameter offload
      is not proven and is refused; fp16 too (its gradient scaler belongs to accelerator.prepare's optimizer).
    - DeepSpeed steps the optimizer inside every accelerator.backward: GradCache's several backwards per step
      and --skip-nonfinite (the check comes after backward) would train wrong.
    - ZeRO-3 shards the parameters, and the export and non-finite weight check read them whole on each
      process: refused, pointing to FSDP2. (The all-gather of negatives gathers activations, not parameters.)
    """
    kind = str(accelerator.distributed_type)
    if "FSDP" in kind:
        plugin = accelerator.state.fsdp_plugin
        version = getattr(plugin, "fsdp_version", 1)
        if version != 2:
            raise LaunchError(f"fsdp_version={version} is not supported: mnr shards with FSDP2; set "
                              f"fsdp_version: 2 in the fsdp_config (accelerate_configs/fsdp.yaml)")
        precision = getattr(accelerator, "mixed_precision", "no")
        if precision not in ("no", "bf16"):  # fp16: Accelerate's grad scaler would scale what mnr's step never unscales
            raise LaunchError(f"mixed_precision={precision} is not supported under FSDP2: use bf16 (or no)")
        if type(getattr(plugin, "cpu_offload", None)).__name__ == "CPUOffloadPolicy":
            raise LaunchError("fsdp_offload_params=true is not supported: parameter offload is not proven with "
                              "mnr's sharded step; set fsdp_offload_params: false")
        if getattr(plugin, "activation_checkpointing", False):
            raise LaunchError("fsdp_activation_checkpointing=true is not read by mnr: set it to false and pass "
                              "--gradient-checkpointing (each layer recomputed in the backward)")
    if cfg.mini_batch_size and "DEEPSPEED" in kind:
        raise LaunchError(f"--mini-batch-size (GradCache) is not supported under {kind}: DeepSpeed steps the "
                          f"optimizer inside each of its several backwards per step; use multi-GPU DDP or FSDP2 "
                          f"(accelerate_configs/fsdp.yaml), or drop --mini-batch-size")
    if "DEEPSPEED" in kind:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        stage = ds.get("zero_optimization", {}).get("stage", 0)
        if stage not in (0, 1, 2):
            raise LaunchError(f"DeepSpeed zero_stage={stage} is not supported: ZeRO-3 shards the parameters, and the "
                              f"model export and non-finite weight check read them whole on each process; to "
                              f"shard the parameters use FSDP2 (accelerate_configs/fsdp.yaml), else zero_stage 1 or 2")
        if cfg.skip_nonfinite:
            raise LaunchError("--skip-nonfinite is not supported under DeepSpeed: DeepSpeed applies the "
                              "optimizer step inside backward, before mnr can check the loss")
        ds["train_micro_batch_size_per_gpu"] = cfg.batch_size  # no DataLoader goes through prepare()
        ds["gradient_accumulation_steps"] = 1
        ds["gradient_clipping"] = cfg.max_grad_norm  # DeepSpeed clips inside its own step (0: no clipping)
