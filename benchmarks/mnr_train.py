"""train_mnr.py for the benchmarks: the same arguments, plus

  MNR_UNPADDED=1     the unpadded forward (mnr.unpadded): `--unpadded` where the config has that field, else the
                     Encoder's forward is switched to mnr.unpadded's here (a model that cannot run unpadded stops
                     the run with the reason);
  MNR_BENCH_PEAK=F   write {"peak_gpu_mib", "reserved_gpu_mib", "unpadded_forwards"} to F at the end.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def switch_to_unpadded(argv: list[str]) -> list[int] | None:
    """Turn the unpadded forward on; -> a one-item counter of unpadded forwards (None: the trainer's own flag)."""
    from mnr.config import TrainConfig

    if "unpadded" in TrainConfig.__dataclass_fields__:
        argv.append("--unpadded")
        return None
    import mnr.model
    from mnr.unpadded import flatten, prepare_unpadded, unpadded_embed

    calls = [0]

    def forward(self, input_ids, attention_mask):
        calls[0] += 1
        if not getattr(self, "_unpadded", False):
            reason = prepare_unpadded(self.transformer)
            if reason:
                raise SystemExit(f"cannot run unpadded: {reason}")
            self._unpadded = True
        return unpadded_embed(self.transformer, flatten(input_ids, attention_mask), self.pipeline.pooling)

    mnr.model.Encoder.forward = forward
    return calls


def main() -> int:
    import torch

    from mnr.train import main as train

    argv = sys.argv[1:]
    calls = switch_to_unpadded(argv) if os.environ.get("MNR_UNPADDED") == "1" else None
    rc = train(argv)
    if os.environ.get("MNR_BENCH_PEAK"):
        cuda = torch.cuda.is_available()
        Path(os.environ["MNR_BENCH_PEAK"]).write_text(json.dumps({
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "reserved_gpu_mib": torch.cuda.max_memory_reserved() / 2**20 if cuda else None,
            "unpadded_forwards": None if calls is None else calls[0]}))
    return rc


if __name__ == "__main__":
    sys.exit(main())
