"""Nothing lost: kill/resume gives the uninterrupted weights, clean SIGTERM, numerical faults, bad input.

Each row of README's "Reliability" table names the test here that backs it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, free_port, load_weights, max_abs_diff, nli_rows, write_tsv
from mnr.train import main

WORKER = str(REPO / "tests" / "fault_worker.py")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _args(model, train, out, *extra):
    return ["--model", str(model), "--train-data", str(train), "--output-dir", str(out), "--batch-size", "4",
            "--max-seq-length", "32", "--report-to", "none", "--no-progress", "--seed", "0", "--eval-data", "none",
            "--lr", "1e-3", *extra]


@pytest.fixture()
def train_file(tmp_path):
    return write_tsv(tmp_path / "nli.tsv", ["premise", "hypothesis", "label"], nli_rows(40))


def _launch(procs: int, script_args: list[str], timeout=240) -> subprocess.CompletedProcess:
    if procs == 1:
        cmd = [sys.executable] + script_args
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port())] + script_args
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=timeout)


def _records(out: Path) -> list[dict]:
    # pairs_per_s is wall-clock timing: everything else must match line for line
    return [{k: v for k, v in json.loads(x).items() if k != "pairs_per_s"}
            for x in (out / "metrics.jsonl").read_text().splitlines()]


# ---- resume after SIGKILL ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("procs", [1, 2])
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, tiny_model_dropout, train_file, procs):
    """Dropout on: the RNG streams of every process are restored too, not only weights and optimizer."""
    common = ["--max-steps", "7", "--save-steps", "2", "--log-steps", "1", "--cache-dir", str(tmp_path / "c")]
    ref = tmp_path / "ref"
    done = _launch(procs, [WORKER, "none", "0", "0", "--"] + _args(tiny_model_dropout, train_file, ref, *common))
    assert done.returncode == 0, done.stderr[-3000:]

    out = tmp_path / "run"
    killed = _launch(procs, [WORKER, "sigkill", "6", ",".join(map(str, range(procs))), "--"]
                     + _args(tiny_model_dropout, train_file, out, *common))
    assert killed.returncode != 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (out / "model.safetensors").exists()

    resumed = _launch(procs, [WORKER, "none", "0", "0", "--"]
                      + _args(tiny_model_dropout, train_file, out, *common, "--resume", "auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "checkpoint-4" in resumed.stderr
    assert max_abs_diff(load_weights(ref), load_weights(out)) < 1e-5
    assert _records(out) == _records(ref)


# ---- SIGTERM / Ctrl-C -----------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_and_exits_nonzero(tmp_path, tiny_model, train_file):
    out = tmp_path / "run"
    common = ["--max-steps", "8", "--log-steps", "1", "--cache-dir", str(tmp_path / "c")]
    proc = _launch(1, [WORKER, "sigterm", "3", "0", "--"] + _args(tiny_model, train_file, out, *common))
    assert proc.returncode == 128 + signal.SIGTERM
    assert (out / "checkpoint-3" / "trainer_state.json").is_file()
    assert "SIGTERM received: stopped after step 3" in proc.stdout and "--resume auto" in proc.stdout
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3
    assert main(_args(tiny_model, train_file, out, *common, "--resume", "auto")) == 0
    ref = tmp_path / "ref"
    assert main(_args(tiny_model, train_file, ref, *common)) == 0
    assert max_abs_diff(load_weights(ref), load_weights(out)) < 1e-5


def test_ctrl_c_saves_and_exits_130(tmp_path, tiny_model, train_file):
    out = tmp_path / "run"
    proc = _launch(1, [WORKER, "sigint", "2", "0", "--"] + _args(tiny_model, train_file, out, "--max-steps", "5"))
    assert proc.returncode == 128 + signal.SIGINT
    assert "SIGINT received: stopped after step 2" in proc.stdout
    assert (out / "checkpoint-2" / "trainer_state.json").is_file() and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_sigterm_on_one_process_stops_all(tmp_path, tiny_model, train_file):
    out = tmp_path / "run"
    proc = _launch(2, [WORKER, "sigterm", "2", "0", "--"]
                   + _args(tiny_model, train_file, out, "--max-steps", "6", "--cache-dir", str(tmp_path / "c")))
    assert proc.returncode != 0
    assert (out / "checkpoint-2" / "training_state" / "random_states_1.pkl").is_file()
    assert "stopped after step 2" in proc.stdout


# ---- changed run shape on resume -------------------------------------------------------------


def test_resume_with_other_batch_size_stops_clearly(tmp_path, tiny_model, train_file, capsys):
    out = tmp_path / "run"
    assert main(_args(tiny_model, train_file, out, "--max-steps", "2", "--save-steps", "2")) == 0
    assert main(_args(tiny_model, train_file, out, "--max-steps", "4", "--batch-size", "6", "--resume", "auto")) == 2
    err = capsys.readouterr().err
    assert "batch_size=4" in err and "batch_size=6" in err and "Traceback" not in err


def test_resume_from_a_directory_that_is_not_a_checkpoint(tmp_path, tiny_model, train_file, capsys):
    assert main(_args(tiny_model, train_file, tmp_path / "o", "--resume", str(tmp_path))) == 2
    assert "not a complete mnr checkpoint" in capsys.readouterr().err


def test_save_total_limit_keeps_newest(tmp_path, tiny_model, train_file):
    out = tmp_path / "run"
    assert main(_args(tiny_model, train_file, out, "--max-steps", "6", "--save-steps", "1",
                      "--save-total-limit", "2")) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-5", "checkpoint-6"]


def test_crash_mid_save_leaves_previous_checkpoint(tmp_path, tiny_model, train_file, monkeypatch, capsys):
    """Disk full while writing checkpoint-4: error names it, checkpoint-2 stays complete, no partial dir."""
    import mnr.train as train_mod

    real = train_mod.save_model
    calls = {"n": 0}

    def full_disk(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(train_mod, "save_model", full_disk)
    out = tmp_path / "run"
    assert main(_args(tiny_model, train_file, out, "--max-steps", "6", "--save-steps", "2")) == 2
    err = capsys.readouterr().err
    assert "checkpoint-4 failed" in err and "No space left" in err and "checkpoint-2" in err
    assert [p.name for p in out.iterdir() if p.name.startswith("checkpoint")] == ["checkpoint-2"]
    monkeypatch.setattr(train_mod, "save_model", real)
    assert main(_args(tiny_model, train_file, out, "--max-steps", "6", "--save-steps", "2", "--resume", "auto")) == 0


# ---- numerical faults -----------------------------------------------------------------------


def test_nan_loss_stops_with_step_and_examples(tmp_path, tiny_model, train_file):
    proc = _launch(1, [WORKER, "nan", "2", "0", "--"]
                   + _args(tiny_model, train_file, tmp_path / "o", "--max-steps", "4", "--cache-dir", str(tmp_path)))
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: non-finite loss or gradient at step 2") and "example indices" in line
    assert "Traceback" not in proc.stderr


def test_nan_loss_skipped_when_asked(tmp_path, tiny_model, train_file):
    out = tmp_path / "o"
    proc = _launch(1, [WORKER, "nan", "2", "0", "--"] + _args(tiny_model, train_file, out, "--max-steps", "4",
                                                             "--skip-nonfinite", "--log-steps", "1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["skipped_steps"] == 1 and last["step"] == 4
    assert "skipping step 2" in proc.stderr
    assert all(torch.isfinite(t).all() for t in load_weights(out).values())


# ---- bad input: one clear line, exit code 2 ----------------------------------------------------


def _bad_input_cases(tmp_path: Path, tiny_model: Path) -> dict:
    good = write_tsv(tmp_path / "good.tsv", ["premise", "hypothesis", "label"], nli_rows(40))
    (tmp_path / "empty.tsv").write_text("")
    write_tsv(tmp_path / "cols.tsv", ["question", "answer"], [["q", "a"]])
    (tmp_path / "latin1.tsv").write_bytes(b"anchor\tpositive\tnegative\ncaf\xe9\tx\ty\n")
    write_tsv(tmp_path / "tiny.tsv", ["anchor", "positive", "negative"], [["a b", "c d", "e f"], ["g", "h", "i"]])
    bad_csv = tmp_path / "quote.csv"
    bad_csv.write_text('anchor,positive,negative\n"stray quote,b,c\nd,e,f\n', encoding="utf-8")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    for f in tiny_model.iterdir():
        if f.suffix != ".safetensors":
            (no_weights / f.name).write_bytes(f.read_bytes())
    (no_weights / "pytorch_model.bin").write_bytes(b"not really a pickle")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    write_tsv(tmp_path / "same.tsv", ["anchor", "positive"], [["a b", "c d"]] * 40)
    data_dir = tmp_path / "data-dir"
    data_dir.mkdir()
    write_tsv(data_dir / "pairs.tsv", ["anchor", "positive"], [["a", "b"]])
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "thesis.pdf").write_text("precious")
    return {
        "empty file": (["--train-data", str(tmp_path / "empty.tsv")], "empty"),
        "no expected columns": (["--train-data", str(tmp_path / "cols.tsv")], "columns found: question, answer"),
        "non-UTF-8 bytes": (["--train-data", str(tmp_path / "latin1.tsv")], "not UTF-8"),
        "stray quote in CSV": (["--train-data", str(bad_csv)], "malformed CSV (unexpected end of data)"),
        "smaller than one batch": (["--train-data", str(tmp_path / "tiny.tsv")], "fewer than one global batch"),
        "batch size 1": (["--batch-size", "1"], "batch_size=1"),
        "seq length beyond positions": (["--max-seq-length", "100"], "max_seq_length=100 exceeds"),
        "not a model": (["--model", str(tmp_path)], "is not a model directory"),
        "no safetensors weights": (["--model", str(no_weights)], "no safetensors weights"),
        "output dir holds other files": (["--output-dir", str(taken)], "--overwrite-output-dir"),
        "output dir unwritable": (["--output-dir", str(blocker / "sub")], "is not writable"),
        "missing train file": (["--train-data", str(tmp_path / "nope.tsv")], "no such file"),
        "train data is a directory": (["--train-data", str(data_dir)], "is a directory, not a data file; data files "
                                      "in it that mnr can read: pairs.tsv"),
        "one pair repeated": (["--train-data", str(tmp_path / "same.tsv"), "--no-hard-negatives",
                               "--max-steps", "5"],
                              "cannot fill one global batch of 4 without a text twice (a false negative): 40 of them"),
    }, good


BAD_INPUTS = ["empty file", "no expected columns", "non-UTF-8 bytes", "stray quote in CSV", "smaller than one batch",
              "batch size 1", "seq length beyond positions", "not a model", "no safetensors weights",
              "output dir holds other files", "output dir unwritable", "missing train file",
              "train data is a directory", "one pair repeated"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gets_one_clear_line(tmp_path, tiny_model, case, capsys):
    cases, good = _bad_input_cases(tmp_path, tiny_model)
    extra, expected = cases[case]
    args = _args(tiny_model, good, tmp_path / "out", "--max-steps", "1") + extra  # later flags win
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and expected in err[-1], err[-1:]
    assert not any("Traceback" in line for line in err)
    assert (tmp_path / "taken" / "thesis.pdf").read_text() == "precious"


def test_stray_quotes_in_tsv_are_text_not_quoting(tmp_path, tiny_model):
    rows = [[f'he said "hi {i}', f'a "quoted {i}" reply', f'no "{i}'] for i in range(8)]
    path = write_tsv(tmp_path / "q.tsv", ["anchor", "positive", "negative"], rows)
    out = tmp_path / "o"
    assert main(_args(tiny_model, path, out, "--max-steps", "1")) == 0


def test_unknown_labels_and_empty_texts_are_counted_skips(tmp_path, tiny_model, caplog):
    rows = nli_rows(12) + [["p", "h", "maybe"], ["  ", "h2", "entailment"], ["p3", "", "entailment"]]
    path = write_tsv(tmp_path / "n.tsv", ["premise", "hypothesis", "label"], rows)
    with caplog.at_level("INFO", logger="mnr"):
        assert main(_args(tiny_model, path, tmp_path / "o", "--max-steps", "1")) == 0
    summary = next(r.getMessage() for r in caplog.records if "examples kept" in r.getMessage())
    assert "1 unknown label" in summary and "2 empty or missing text" in summary


# ---- security ---------------------------------------------------------------------------------


def test_resume_state_is_loaded_with_weights_only(tmp_path, tiny_model, train_file, monkeypatch):
    out = tmp_path / "run"
    assert main(_args(tiny_model, train_file, out, "--max-steps", "2", "--save-steps", "2")) == 0
    seen = []
    real_load = torch.load

    def spy(*a, **k):
        seen.append((str(a[0]) if a else "", k.get("weights_only")))
        return real_load(*a, **k)

    monkeypatch.setattr(torch, "load", spy)
    assert main(_args(tiny_model, train_file, out, "--max-steps", "3", "--resume", "auto")) == 0
    assert seen and all(w is True for _, w in seen), seen


def test_remote_code_is_off_by_default(tmp_path, tiny_model, monkeypatch):
    import transformers

    seen = []
    real = transformers.AutoConfig.from_pretrained

    def spy(*a, **k):
        seen.append(k.get("trust_remote_code"))
        return real(*a, **k)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", spy)
    from mnr.model import load_encoder

    load_encoder(str(tiny_model))
    assert seen and set(seen) == {False}
    seen.clear()
    load_encoder(str(tiny_model), trust_remote_code=True)
    assert seen and set(seen) == {True}
