"""End-to-end: main([...]) trains a few steps and writes a checkpoint that loads everywhere."""

import json
import subprocess
import sys

import pytest
import torch

from mnr.backbone import Backbone
from mnr.train import linear_schedule, main

REPO_ROOT = __import__("conftest").REPO


from conftest import train_args as _args


def test_schedule_warms_up_over_total_steps_and_decays_to_zero():
    f = linear_schedule(total_steps=100, warmup_steps=10)
    lrs = [f(s) for s in range(101)]
    assert lrs[0] == 0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5)  # halfway through the decay of the 90 post-warm-up steps
    assert lrs[100] == 0 and max(lrs) == 1.0
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:11])) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    # no warm-up: full rate at the first step
    assert linear_schedule(10, 0)(0) == 1.0


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model):
    from conftest import WORDS, nli_rows, write_tsv

    root = tmp_path_factory.mktemp("run")
    train = write_tsv(root / "nli.tsv", ["premise", "hypothesis", "label"], nli_rows(40))
    sts = write_tsv(root / "sts.tsv", ["sentence1", "sentence2", "score"],
                    [[f"a {WORDS[i]} dog runs", f"the {WORDS[-i]} dog {i} is running", str(i % 5)]
                     for i in range(20)])
    out = root / "out"
    rc = main(_args(tiny_model, train, out, "--eval-data", str(sts), "--max-steps", "6", "--log-steps", "2",
                    "--eval-steps", "3", "--save-steps", "3", "--lr", "1e-3", "--cache-dir", str(root / "cache")))
    assert rc == 0
    return out, sts


def test_run_writes_model_metrics_checkpoints_and_best(trained):
    out, _ = trained
    for name in ["model.safetensors", "config.json", "tokenizer.json", "modules.json", "1_Pooling/config.json",
                 "config_sentence_transformers.json", "sentence_bert_config.json", "README.md", "metrics.jsonl"]:
        assert (out / name).is_file(), name
    assert (out / "checkpoint-3" / "model.safetensors").is_file() and (out / "checkpoint-6").is_dir()
    assert (out / "best" / "model.safetensors").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_logs = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_logs] == [2, 4, 6]
    assert all(r["global_batch"] == 4 and r["negatives_per_anchor"] == 7 for r in train_logs)
    assert train_logs[0]["lr"] > 0
    evals = [r for r in records if "sts/spearman" in r]  # the evaluator is named after its file
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == 32
    card = (out / "README.md").read_text()
    assert "Optimizer steps: 6" in card and "spearman" in card


def test_weights_changed(trained, tiny_model):
    from safetensors.torch import load_file

    before = load_file(str(tiny_model / "model.safetensors"))
    after = load_file(str(trained[0] / "model.safetensors"))
    key = "encoder.layer.0.attention.self.query.weight"
    assert (before[key] - after[key]).abs().max() > 1e-4


def test_checkpoint_loads_with_automodel_and_sentence_transformers(trained):
    out, _ = trained
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    from mnr.evaluate import encode
    from mnr.model import mean_pool

    texts = ["a man is playing with a dog", "two children sitting", "a red car"]
    backbone = Backbone.load(str(out))  # the trainer's own encoder
    ours = encode(backbone, texts, max_seq_length=32)
    hf_model, hf_tok = AutoModel.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    hf_model.eval()
    batch = hf_tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        hf = mean_pool(hf_model(**batch).last_hidden_state, batch["attention_mask"])
    st = torch.from_numpy(SentenceTransformer(str(out), device="cpu").encode(texts))
    assert (ours - hf).abs().max() < 1e-5
    assert (ours - st).abs().max() < 1e-5


def test_evaluate_cli_prints_spearman(trained):
    out, sts = trained
    proc = subprocess.run([sys.executable, "-m", "mnr.evaluate", str(out), "--data", str(sts)],
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "STS Spearman x100" in proc.stdout and "20 pairs" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "mnr.evaluate", str(out), "--data", str(out / "config.json")],
                         capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert bad.returncode == 2 and "error:" in bad.stderr and "Traceback" not in bad.stderr


def test_same_seed_same_weights(tmp_path, tiny_model, nli_file):
    from safetensors.torch import load_file

    outs = []
    for name in ("a", "b"):
        assert main(_args(tiny_model, nli_file, tmp_path / name, "--max-steps", "3", "--eval-data", "none",
                          "--cache-dir", str(tmp_path / "cache"))) == 0
        outs.append(load_file(str(tmp_path / name / "model.safetensors")))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_output_dir_with_other_files_is_refused(tmp_path, tiny_model, nli_file, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(_args(tiny_model, nli_file, out, "--max-steps", "1", "--eval-data", "none")) == 2
    assert "--overwrite-output-dir" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"


def test_tensorboard_tracker_gets_the_metrics(tmp_path, tiny_model, nli_file):
    pytest.importorskip("tensorboard")
    out = tmp_path / "tb"
    assert main(_args(tiny_model, nli_file, out, "--max-steps", "2", "--log-steps", "1", "--eval-data", "none",
                      "--report-to", "tensorboard")) == 0
    events = list((out / "mnr").glob("events.out.tfevents.*"))  # (the run config goes to a subfolder)
    assert len(events) == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert {"loss", "lr", "pairs_per_s"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("loss")] == [1, 2]


def test_logged_loss_is_the_mean_over_the_steps_since_the_last_log_line(tmp_path, tiny_model, nli_file):
    every = tmp_path / "every"
    pairs = tmp_path / "pairs"
    common = ("--max-steps", "4", "--eval-data", "none", "--lr", "1e-3", "--cache-dir", str(tmp_path / "c"))
    assert main(_args(tiny_model, nli_file, every, *common, "--log-steps", "1")) == 0
    assert main(_args(tiny_model, nli_file, pairs, *common, "--log-steps", "2")) == 0
    per_step = [json.loads(x)["loss"] for x in (every / "metrics.jsonl").read_text().splitlines()]
    logged = [json.loads(x) for x in (pairs / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [2, 4]
    for record, (a, b) in zip(logged, [per_step[0:2], per_step[2:4]]):
        assert record["loss"] == pytest.approx((a + b) / 2, abs=1e-6)
        assert record["loss_last_step"] == pytest.approx(b, abs=1e-6)
    assert per_step[0] != pytest.approx(per_step[1], abs=1e-6)  # the mean is not just one of them


def test_without_a_terminal_the_log_has_plain_step_lines_and_no_bar(tmp_path, tiny_model, nli_file):
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "train_mnr.py"), *_args(
        tiny_model, nli_file, out, "--max-steps", "2", "--log-steps", "1", "--eval-data", "none", "--progress",
        "--cache-dir", str(tmp_path / "c"))], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = proc.stdout + proc.stderr
    assert "step 1/2  loss" in log and "step 2/2  loss" in log
    assert "━" not in log and "\r" not in log  # no bar rendered into the file
    assert "1 process x 4" in log


def test_matryoshka_run_trains_and_a_size_above_the_model_is_refused(tmp_path, tiny_model, nli_file, capsys):
    common = ("--max-steps", "2", "--eval-data", "none", "--cache-dir", str(tmp_path / "c"))
    assert main(_args(tiny_model, nli_file, tmp_path / "m", *common, "--matryoshka-dims", "32,16,8",
                      "--matryoshka-weights", "1,1,1")) == 0
    plain = tmp_path / "p"
    assert main(_args(tiny_model, nli_file, plain, *common)) == 0
    first = lambda out: json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]  # noqa: E731
    assert first(tmp_path / "m") > first(plain)  # three losses summed, same first batch
    assert main(_args(tiny_model, nli_file, tmp_path / "x", *common, "--matryoshka-dims", "64,16")) == 2
    assert "the model's embeddings have 32 dimensions" in capsys.readouterr().err


def test_every_evaluator_runs_in_training_and_metric_for_best_picks_best(tmp_path, tiny_model, nli_file, sts_file,
                                                                          capsys, caplog):
    from conftest import WORDS, write_tsv

    dev = write_tsv(tmp_path / "dev_pairs.tsv", ["anchor", "positive"],
                    [[f"a man {w} {i} is outside", f"a person {w} {i} plays"] for i, w in enumerate(WORDS[10:18])])
    out = tmp_path / "o"
    common = ("--max-steps", "4", "--eval-steps", "2", "--lr", "1e-3", "--cache-dir", str(tmp_path / "c"),
              "--eval-data", f"{sts_file},{dev}")
    assert main(_args(tiny_model, nli_file, out, *common, "--metric-for-best", "dev_pairs/mrr@10")) == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "dev_pairs/ndcg@10" in r]
    assert [r["step"] for r in evals] == [0, 2, 4] and all("sts/spearman" in r for r in evals)
    assert {"dev_pairs/mrr@10", "dev_pairs/recall@10", "dev_pairs/map@100", "dev_pairs/accuracy@1"} <= set(evals[0])
    best = max(evals[1:], key=lambda r: r["dev_pairs/mrr@10"])["dev_pairs/mrr@10"]
    card = (out / "best" / "README.md").read_text()
    assert f"{best:.4f}" in card  # best/ is the model of the best mrr@10
    assert "evaluation: retrieval, dev_pairs" in caplog.text  # each set's kind named in the start-up log
    assert "eval after training: sts/spearman" in capsys.readouterr().out
    assert main(_args(tiny_model, nli_file, tmp_path / "x", *common, "--metric-for-best", "dev_pairs/ndcg@11")) == 2
    err = capsys.readouterr().err
    assert "metric_for_best='dev_pairs/ndcg@11'" in err and "sts/spearman" in err

