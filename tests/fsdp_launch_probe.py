"""Writes OUT_DIR/rank<r>.txt: Accelerate's distributed type and mnr.sharding.fsdp_launch_problem of its state
(tests/test_fsdp.py launches it with accelerate_configs/fsdp.yaml on the CPU)."""

import os
import sys
from pathlib import Path

from accelerate import PartialState

from mnr.sharding import fsdp_launch_problem

state = PartialState()
Path(sys.argv[1], f"rank{os.environ.get('RANK')}.txt").write_text(f"{state.distributed_type} {fsdp_launch_problem(state)}")
