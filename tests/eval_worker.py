"""Run by tests/test_retrieval.py as
    accelerate launch --multi_gpu --num_processes 2 tests/eval_worker.py TINY_MODEL_DIR EVAL_SPEC OUT_JSON
(gloo on the CPU): every process runs every evaluator (batches of 4, 3 queries per scoring chunk) and rank 0
writes all processes' results to OUT_JSON.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    from accelerate import Accelerator

    from mnr import distributed
    from mnr.evaluate import build_evaluators
    from mnr.backbone import Backbone

    model_path, spec, out_path = sys.argv[1:4]
    accelerator = Accelerator(cpu=True)
    assert distributed.world_size() == 2, "expected 2 processes"
    backbone = Backbone.load(model_path)
    results = []
    for ev in build_evaluators(spec, max_seq_length=32, batch_size=4):
        ev.query_chunk = 3
        results.append(ev.by_dim(backbone)[None])
    everyone = distributed.all_gather_object({"rank": distributed.rank(), "world": distributed.world_size(),
                                              "results": results})
    if accelerator.is_main_process:
        with open(out_path, "w", encoding="utf-8") as fh:
            json.dump(everyone, fh)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main()
