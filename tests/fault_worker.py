"""Runs the trainer with a fault injected, for the reliability tests (also under `accelerate launch`).

    python tests/fault_worker.py KIND STEP RANKS -- TRAIN_ARGS...
KIND: sigkill | sigterm | sigint | nan.  During the loss of optimizer step STEP (1-based), every process whose rank is in
RANKS (comma separated) sends itself KIND (nan: the loss becomes NaN instead).
"""

import os
import signal
import sys

import torch

import mnr.objectives as objectives
import mnr.train as train

kind, at, ranks = sys.argv[1], int(sys.argv[2]), {int(r) for r in sys.argv[3].split(",")}
argv = sys.argv[sys.argv.index("--") + 1 :]
calls = {"n": 0}
real_loss = objectives.mnr_loss


def faulty_loss(*args, **kwargs):
    calls["n"] += 1
    loss = real_loss(*args, **kwargs)
    rank = int(os.environ.get("RANK", "0"))
    if calls["n"] == at and rank in ranks:
        if kind == "nan":
            return loss * torch.tensor(float("nan"))
        os.kill(os.getpid(), {"sigkill": signal.SIGKILL, "sigterm": signal.SIGTERM, "sigint": signal.SIGINT}[kind])
    return loss


objectives.mnr_loss = faulty_loss
sys.exit(train.main(argv))
