"""mnr: Multiple Negatives Ranking fine-tuning for sentence embeddings, driven by Accelerate."""

__version__ = "0.1.0"
