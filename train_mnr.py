"""Fine-tune a sentence-embedding model with Multiple Negatives Ranking loss.

One process (debugging, CPU or one GPU):
    python train_mnr.py                                   # embedded default: MiniLM on the shipped SNLI sample
    python train_mnr.py --model bert-base-uncased --train-data snli,glue/mnli --no-hard-negatives

Any number of processes / machines (Accelerate decides devices and precision):
    accelerate launch train_mnr.py ...
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml --mixed_precision bf16 train_mnr.py ...

The flow of one step, each stage its own module:
    data (mnr.data) -> global batch (mnr.batching) -> encoder (mnr.model) -> loss (mnr.loss,
    negatives gathered by mnr.distributed) -> step (mnr.train: backward, clip, AdamW, schedule)
"""

import sys

from mnr.train import main

if __name__ == "__main__":
    sys.exit(main())
