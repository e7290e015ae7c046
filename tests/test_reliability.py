"""Nothing lost: kill/resume gives the uninterrupted weights, clean SIGTERM, numerical faults, bad input.

Each row of the fault table in docs/reliability.md names the test here that backs it.
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

from conftest import REPO, free_port, load_weights, max_abs_diff, nli_rows, train_args, write_tsv
from mnr.train import main

WORKER = str(REPO / "tests" / "fault_worker.py")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _args(model, train, out, *extra):
    return train_args(model, train, out, "--eval-data", "none", "--lr", "1e-3", *extra)


@pytest.fixture()
def train_file(tmp_path):
    return write_tsv(tmp_path / "nli.tsv", ["premise", "hypothesis", "label"], nli_rows(40))


def _launch(procs: int, script_args: list[str], timeout=240, sharded: bool = False) -> subprocess.CompletedProcess:
    if procs == 1:
        cmd = [sys.executable] + script_args
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port())] + script_args
    env = {**ENV, "MNR_FSDP_CPU": "1"} if sharded else ENV  # sharded: FSDP2 over the gloo processes
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)


def _records(out: Path) -> list[dict]:
    # pairs_per_s is wall-clock timing: everything else must match line for line
    return [{k: v for k, v in json.loads(x).items() if k != "pairs_per_s"}
            for x in (out / "metrics.jsonl").read_text().splitlines()]


# ---- resume after SIGKILL ------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("procs, sharded", [(1, False), (2, False), (2, True)], ids=["1", "2", "2-fsdp"])
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, tiny_model_dropout, train_file, procs, sharded):
    """Dropout on: the RNG streams of every process are restored too, not only weights and optimizer (sharded:
    from each process's shard)."""
    common = ["--max-steps", "7", "--save-steps", "2", "--log-steps", "1", "--cache-dir", str(tmp_path / "c")]
    ref = tmp_path / "ref"
    done = _launch(procs, [WORKER, "none", "0", "0", "--"] + _args(tiny_model_dropout, train_file, ref, *common),
                   sharded=sharded)
    assert done.returncode == 0, done.stderr[-3000:]

    out = tmp_path / "run"
    killed = _launch(procs, [WORKER, "sigkill", "6", ",".join(map(str, range(procs))), "--"]
                     + _args(tiny_model_dropout, train_file, out, *common), sharded=sharded)
    assert killed.returncode != 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not (out / "model.safetensors").exists()

    resumed = _launch(procs, [WORKER, "none", "0", "0", "--"]
                      + _args(tiny_model_dropout, train_file, out, *common, "--resume", "auto"), sharded=sharded)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "checkpoint-4" in resumed.stderr
    assert (out / "checkpoint-4" / "training_state" / "sharded").is_dir() == sharded
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
    assert main(_args(tiny_model, train_file, out, "--max-steps", "2", "--batch-size", "6", "--resume", "auto")) == 2
    err = capsys.readouterr().err
    assert "batch_size: 4 -> 6" in err and "Traceback" not in err


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
    import mnr.model as model_mod  # the backbone's export writes through it

    real = model_mod.save_model
    calls = {"n": 0}

    def full_disk(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(model_mod, "save_model", full_disk)
    out = tmp_path / "run"
    assert main(_args(tiny_model, train_file, out, "--max-steps", "6", "--save-steps", "2")) == 2
    err = capsys.readouterr().err
    assert "checkpoint-4 failed" in err and "No space left" in err and "checkpoint-2" in err
    assert [p.name for p in out.iterdir() if p.name.startswith("checkpoint")] == ["checkpoint-2"]
    monkeypatch.setattr(model_mod, "save_model", real)
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
        "cache dir is a file": (["--cache-dir", str(blocker)], "cache_dir="),
        "lr inf": (["--lr", "inf"], "lr=inf"),
        "weight decay nan": (["--weight-decay", "nan"], "weight_decay=nan"),
        "scale absurd": (["--scale", "1e9"], "scale=1000000000.0"),
        "max grad norm inf": (["--max-grad-norm", "inf"], "max_grad_norm=inf"),
        "train data is a directory": (["--train-data", str(data_dir)], "is a directory, not a data file; data files "
                                      "in it that mnr can read: pairs.tsv"),
        "one pair repeated": (["--train-data", str(tmp_path / "same.tsv"), "--no-hard-negatives",
                               "--max-steps", "5"],
                              "cannot fill one global batch of 4 without a text twice (a false negative): 40 of them"),
    }, good


BAD_INPUTS = ["empty file", "no expected columns", "non-UTF-8 bytes", "stray quote in CSV", "smaller than one batch",
              "batch size 1", "seq length beyond positions", "not a model", "no safetensors weights",
              "output dir holds other files", "output dir unwritable", "missing train file", "cache dir is a file", "lr inf",
              "weight decay nan", "scale absurd", "max grad norm inf", "train data is a directory", "one pair repeated"]


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
    assert main(_args(tiny_model, train_file, out, "--max-steps", "3", "--save-steps", "2")) == 0
    seen = []
    real_load = torch.load

    def spy(*a, **k):
        seen.append((str(a[0]) if a else "", k.get("weights_only")))
        return real_load(*a, **k)

    monkeypatch.setattr(torch, "load", spy)
    assert main(_args(tiny_model, train_file, out, "--max-steps", "3", "--save-steps", "2", "--resume", "auto")) == 0
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


# ---- run identity and output dirs (issue 10) ----------------------------------------------------


def _ckpts(out: Path) -> list[str]:
    return sorted((p.name for p in out.glob("checkpoint-*")), key=lambda n: int(n.split("-")[1]))


def test_overwrite_moves_old_checkpoints_aside_so_resume_continues_the_new_run(tmp_path, tiny_model, train_file,
                                                                               caplog):
    """Run A to the end, run B into the same dir (other data) stopped at step 3: --resume auto continues B."""
    out = tmp_path / "run"
    common = ["--max-steps", "4", "--save-steps", "2", "--cache-dir", str(tmp_path / "c")]
    assert main(_args(tiny_model, train_file, out, *common)) == 0
    other = write_tsv(tmp_path / "other.tsv", ["premise", "hypothesis", "label"], nli_rows(30))
    b_args = _args(tiny_model, other, out, *common)
    stopped = _launch(1, [WORKER, "sigterm", "3", "0", "--"] + b_args + ["--overwrite-output-dir"])
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    assert "moved the earlier run's checkpoint-2, checkpoint-4" in stopped.stderr
    assert _ckpts(out) == ["checkpoint-2", "checkpoint-3"]
    assert [p.name for p in out.glob("superseded-*/checkpoint-*")] != []
    with caplog.at_level("INFO"):
        assert main(b_args + ["--resume", "auto"]) == 0
    assert any("checkpoint-3 at step 3" in r.getMessage() for r in caplog.records)
    assert str(other) in (out / "README.md").read_text()


def test_resume_never_writes_into_the_model_dir_or_a_finished_run(tmp_path, tiny_model, train_file, capsys):
    model = tmp_path / "model"
    model.mkdir()
    for f in tiny_model.iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    before = {f.name: f.read_bytes() for f in model.iterdir()}
    for extra in (["--resume", "auto"], ["--overwrite-output-dir"]):
        assert main(_args(model, train_file, model, "--max-steps", "1", *extra)) == 2
        assert "is or contains the model being trained" in capsys.readouterr().err
    assert {f.name: f.read_bytes() for f in model.iterdir()} == before
    out = tmp_path / "done"
    assert main(_args(tiny_model, train_file, out, "--max-steps", "1")) == 0
    assert main(_args(tiny_model, train_file, out, "--max-steps", "1", "--resume", "auto")) == 2
    assert "finished, and no checkpoint to resume" in capsys.readouterr().err
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "thesis.pdf").write_text("precious")
    assert main(_args(tiny_model, train_file, taken, "--max-steps", "1", "--resume", "auto")) == 2
    assert "not an mnr run" in capsys.readouterr().err
    assert sorted(p.name for p in taken.iterdir()) == ["thesis.pdf"]


def test_resume_with_changed_settings_or_data_names_every_change(tmp_path, tiny_model, train_file, capsys):
    out = tmp_path / "run"
    common = ["--max-steps", "2", "--save-steps", "1"]
    assert main(_args(tiny_model, train_file, out, *common)) == 0
    train_file.write_text(train_file.read_text().replace("playing", "singing"))
    changed = ["--lr", "2e-3", "--weight-decay", "0.1", "--max-seq-length", "24", "--max-steps", "3", "--resume"]
    for where in ("auto", str(out / "checkpoint-1")):  # the output-dir guard, and the checkpoint itself
        target = out if where == "auto" else tmp_path / "elsewhere"
        assert main(_args(tiny_model, train_file, target, *common, *changed, where)) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        for change in ("lr: 0.001 -> 0.002", "weight_decay: 0.01 -> 0.1", "max_seq_length: 32 -> 24",
                       "max_steps: 2 -> 3", "train_data_files: '"):
            assert change in err, err
        assert "eval_steps" not in err and "log_steps" not in err


def test_resume_may_change_logging_eval_and_save_cadence(tmp_path, tiny_model, train_file):
    out = tmp_path / "run"
    assert main(_args(tiny_model, train_file, out, "--max-steps", "3", "--save-steps", "1")) == 0
    assert main(_args(tiny_model, train_file, out, "--max-steps", "3", "--save-steps", "2", "--log-steps", "1",
                      "--save-total-limit", "1", "--skip-nonfinite", "--eval-dims", "8",
                      "--resume", str(out / "checkpoint-2"))) == 0


def test_rotation_removes_the_abandoned_branch_first_and_never_what_it_just_saved():
    from mnr.checkpoint import rotated_out

    ckpts = [Path(f"checkpoint-{s}") for s in (1, 2, 3, 4)]
    assert [p.name for p in rotated_out(ckpts, 2, 2)] == ["checkpoint-3", "checkpoint-4"]
    assert [p.name for p in rotated_out(ckpts, 4, 2)] == ["checkpoint-1", "checkpoint-2"]
    assert [p.name for p in rotated_out(ckpts, 1, 1)] == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]


def test_stop_after_resume_from_an_older_checkpoint_keeps_the_named_checkpoint(tmp_path, tiny_model, train_file):
    out = tmp_path / "run"
    common = ["--max-steps", "4", "--save-steps", "1", "--cache-dir", str(tmp_path / "c")]
    assert main(_args(tiny_model, train_file, out, *common)) == 0
    proc = _launch(1, [WORKER, "sigterm", "1", "0", "--"] + _args(tiny_model, train_file, out, *common,
                   "--save-total-limit", "2", "--resume", str(out / "checkpoint-1")))
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert f"state saved in {out / 'checkpoint-2'}" in proc.stdout
    assert _ckpts(out) == ["checkpoint-1", "checkpoint-2"]


def test_a_second_run_into_a_busy_dir_is_refused_and_a_dead_holders_lock_taken_over(tmp_path, tiny_model,
                                                                                      train_file, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(out / '.mnr.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
                               "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'pid 4242 on elsewhere')\n"
                               "print('locked', flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(_args(tiny_model, train_file, out, "--max-steps", "1")) == 2
        err = capsys.readouterr().err
        assert "in use by another mnr run (pid 4242 on elsewhere)" in err
    finally:
        holder.kill()
        holder.wait()
    assert main(_args(tiny_model, train_file, out, "--max-steps", "1")) == 0  # the dead holder's lock is free


# ---- never spin, never export a poisoned model (issue 10) ----------------------------------------


def test_data_without_a_duplicate_free_batch_stops_instead_of_spinning(tmp_path, tiny_model):
    rows = [["one shared anchor", f"a man {i} is playing", f"a dog {i} runs"] for i in range(12)]
    path = write_tsv(tmp_path / "same.tsv", ["anchor", "positive", "negative"], rows)
    try:
        proc = _launch(1, [str(REPO / "train_mnr.py")] + _args(tiny_model, path, tmp_path / "o", "--max-steps", "5"),
                       timeout=120)
    except subprocess.TimeoutExpired:
        pytest.xfail("spins on empty epochs: the sampler fix is on the store branch")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ") and "Traceback" not in proc.stderr


def _poison_weights_at(monkeypatch, call: int) -> None:
    real = torch.optim.AdamW.step
    calls = {"n": 0}

    def step(self, *a, **k):
        out = real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == call:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)


@pytest.mark.parametrize("poisoned_at, expected", [(1, "the weights hold NaN or inf at step 2"),
                                                   (3, "not exported")])
def test_nonfinite_weights_are_never_exported(tmp_path, tiny_model, train_file, monkeypatch, capsys, poisoned_at,
                                              expected):
    _poison_weights_at(monkeypatch, poisoned_at)
    out = tmp_path / "o"
    assert main(_args(tiny_model, train_file, out, "--max-steps", "3", "--skip-nonfinite")) == 2
    assert expected in capsys.readouterr().err
    assert not (out / "model.safetensors").exists()


def test_skip_nonfinite_stops_when_too_many_steps_are_skipped(tmp_path, tiny_model, train_file, monkeypatch, capsys):
    import mnr.objectives as objectives

    real = objectives.mnr_loss
    monkeypatch.setattr(objectives, "mnr_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    assert main(_args(tiny_model, train_file, tmp_path / "o", "--max-steps", "4", "--skip-nonfinite")) == 2
    assert "2 of 4 steps skipped" in capsys.readouterr().err


# ---- damaged state (issue 10) -------------------------------------------------------------------


def test_damaged_checkpoints_fall_back_to_the_newest_intact_one(tmp_path, tiny_model, train_file, caplog, capsys):
    out = tmp_path / "run"
    common = ["--max-steps", "6", "--save-steps", "2", "--log-steps", "1"]
    assert main(_args(tiny_model, train_file, out, *common)) == 0
    weights = out / "checkpoint-6" / "training_state" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    state_file = out / "checkpoint-4" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["global_step"]  # a key missing
    state_file.write_text(json.dumps(state))
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 7, "lo')  # a last line cut short
    assert main(_args(tiny_model, train_file, tmp_path / "x", *common, "--resume", str(out / "checkpoint-6"))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "training_state/model.safetensors is damaged (100 bytes" in err[-1]
    with caplog.at_level("INFO"):
        assert main(_args(tiny_model, train_file, out, *common, "--resume", "auto")) == 0
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "checkpoint-6" in warnings and "checkpoint-4" in warnings and "falling back" in warnings
    assert "metrics.jsonl line" in warnings and "damaged, dropped" in warnings
    assert any("resumed from" in r.getMessage() and "checkpoint-2 " in r.getMessage() for r in caplog.records)
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines() if "loss" in x] == [
        1, 2, 3, 4, 5, 6]


def test_no_intact_checkpoint_stops_with_one_line(tmp_path, tiny_model, train_file, capsys):
    out = tmp_path / "run"
    assert main(_args(tiny_model, train_file, out, "--max-steps", "2", "--save-steps", "2")) == 0
    (out / "checkpoint-2" / "training_state" / "optimizer.bin").write_bytes(b"")
    assert main(_args(tiny_model, train_file, out, "--max-steps", "2", "--save-steps", "2", "--resume", "auto")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "optimizer.bin is damaged" in err[-1]
    assert not any("Traceback" in line for line in err)


# ---- several processes: one error line (issue 10) ------------------------------------------------


@pytest.mark.slow
def test_bad_input_under_two_processes_prints_one_error_line(tmp_path, tiny_model):
    (tmp_path / "empty.tsv").write_text("")
    proc = _launch(2, [str(REPO / "train_mnr.py")] + _args(tiny_model, tmp_path / "empty.tsv", tmp_path / "o",
                                                          "--max-steps", "1"), timeout=180)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert [x for x in lines if x.startswith("error: ")] == [f"error: {tmp_path / 'empty.tsv'}: file is empty "
                                                             f"(no header line)"]
    assert not any(x.startswith("[rank") for x in lines), proc.stderr[-3000:]
    assert "exitcode  : 2" in proc.stderr  # every worker exits 2 (the launcher itself always exits 1)


def test_a_damaged_run_record_falls_back_to_the_checkpoints_identity(tmp_path, tiny_model, train_file, capsys):
    out = tmp_path / "run"
    common = ["--max-steps", "2", "--save-steps", "1"]
    assert main(_args(tiny_model, train_file, out, *common)) == 0
    (out / "mnr_run.json").write_text('{"run_identity": {"lr"')  # cut short
    assert main(_args(tiny_model, train_file, out, *common, "--lr", "2e-3", "--resume", "auto")) == 2
    assert "lr: 0.001 -> 0.002" in capsys.readouterr().err
    state = out / "checkpoint-2" / "trainer_state.json"
    state.write_text(state.read_text().replace('"global_step": 2', '"global_step": "two"'))
    assert main(_args(tiny_model, train_file, out, *common, "--resume", "auto")) == 0  # falls back to checkpoint-1
    assert json.loads((out / "mnr_run.json").read_text())["run_identity"]["lr"] == 1e-3


def test_running_the_same_command_twice_says_the_run_is_finished_and_what_to_pass(tmp_path, tiny_model, train_file,
                                                                                   capsys):
    out = tmp_path / "o"
    assert main(_args(tiny_model, train_file, out, "--max-steps", "1")) == 0
    capsys.readouterr()
    assert main(_args(tiny_model, train_file, out, "--max-steps", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert "holds this run, finished" in err and "--overwrite-output-dir" in err and "--resume auto" not in err
