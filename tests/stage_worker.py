"""Runs the trainer and sends itself a signal at a stage, for the signal tests of tests/test_safety.py.

    python tests/stage_worker.py SIGNAL FUNCTION CALL -- TRAIN_ARGS...
SIGNAL: sigterm | sigint | sighup.  On call number CALL of mnr.train.FUNCTION (e.g. evaluate: 1 is the evaluation
before training, then one per evaluation), the process sends itself SIGNAL, then the call goes on.
"""

import os
import signal
import sys

import mnr.train as train

kind, name, at = sys.argv[1], sys.argv[2], int(sys.argv[3])
argv = sys.argv[sys.argv.index("--") + 1 :]
real = getattr(train, name)
calls = {"n": 0}


def wrapper(*args, **kwargs):
    calls["n"] += 1
    if calls["n"] == at:
        os.kill(os.getpid(), getattr(signal, kind.upper()))
    return real(*args, **kwargs)


setattr(train, name, wrapper)
sys.exit(train.main(argv))
