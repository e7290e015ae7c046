"""Nothing lost: writers never meet their own input, a stop signal is heard from set-up to export, a full disk
gives one line and leaves nothing partial, "finished" means exported, a failed run leaves no clutter.

Rows of docs/reliability.md name the tests here.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import REPO, WORDS, nli_rows, train_args, write_tsv
import mnr.model  # the backbone's export writes through mnr.model.save_model
from mnr.atomic import ExclusiveLock, WriteError, atomic_dir, staged_into
from mnr.train import main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
STAGE_WORKER = str(REPO / "tests" / "stage_worker.py")


def _args(model, train, out, *extra):
    return train_args(model, train, out, "--eval-data", "none", "--lr", "1e-3", *extra)


@pytest.fixture()
def train_file(tmp_path):
    return write_tsv(tmp_path / "nli.tsv", ["premise", "hypothesis", "label"], nli_rows(40))


@pytest.fixture()
def sts(tmp_path):
    return write_tsv(tmp_path / "sts.tsv", ["sentence1", "sentence2", "score"],
                     [[f"a {WORDS[i]} dog runs", f"the {WORDS[-i]} dog {i} is running", str(i % 5)] for i in range(20)])


def _signal_on_call(monkeypatch, module, name: str, call: int, sig=signal.SIGTERM, times: int = 1) -> dict:
    """Make module.name send `sig` to this process (a real signal, `times` times) on its call number `call`."""
    real = getattr(module, name)
    calls = {"n": 0}

    def wrapper(*a, **k):
        calls["n"] += 1
        if calls["n"] == call:
            for _ in range(times):
                os.kill(os.getpid(), sig)
        return real(*a, **k)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


# ---- writers that would meet their own input ------------------------------------------------------


@pytest.mark.parametrize("how", ["same path", "hard link", "symbolic link", "corpus", "summary"])
def test_mine_refuses_an_output_that_is_one_of_its_inputs(tmp_path, tiny_model, capsys, how):
    from mnr.mine import main as mine

    pairs = write_tsv(tmp_path / "pairs.tsv", ["premise", "hypothesis", "label"], nli_rows(6))
    corpus = write_tsv(tmp_path / "corpus.tsv", ["text"], [["a text"], ["another text"]])
    before = {p: p.read_bytes() for p in (pairs, corpus)}
    output, extra = pairs, []
    if how == "hard link":
        output = tmp_path / "link.tsv"
        os.link(pairs, output)
    elif how == "symbolic link":
        output = tmp_path / "link.tsv"
        output.symlink_to(pairs)
    elif how == "corpus":
        output, extra = corpus, ["--corpus", str(corpus)]
    elif how == "summary":  # <output>.summary.json is the pairs file
        (tmp_path / "m.tsv.summary.json").symlink_to(pairs)
        output = tmp_path / "m.tsv"
    assert mine([str(pairs), "--output", str(output), "--model", str(tiny_model), *extra]) == 2
    err = capsys.readouterr().err
    assert "is the input" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in (pairs, corpus)} == before


def test_mine_writes_aside_so_a_full_disk_leaves_the_previous_output(tmp_path, tiny_model, capsys, monkeypatch):
    import mnr.mine as mine_mod

    pairs = write_tsv(tmp_path / "pairs.tsv", ["premise", "hypothesis", "label"], nli_rows(6))
    out = tmp_path / "mined.tsv"
    out.write_text("the previous output\n")
    real_open = open

    def full_open(path, *a, **k):
        fh = real_open(path, *a, **k)
        if ".tmp-" in str(path):
            fh.write = lambda *_: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
        return fh

    monkeypatch.setattr(mine_mod, "open", full_open, raising=False)
    assert mine_mod.main([str(pairs), "--output", str(out), "--model", str(tiny_model), "--num-negatives", "1",
                          "--max-seq-length", "32"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: cannot write {out}: disk full (No space left on device)"
    assert out.read_text() == "the previous output\n" and _names(tmp_path) == ["mined.tsv", "pairs.tsv"]


def test_overwrite_leaves_the_runs_own_inputs_in_the_output_dir(tmp_path, tiny_model, caplog):
    out = tmp_path / "run"
    assert main(_args(tiny_model, tmp_path / "x.tsv", out, "--max-steps", "1")) == 2  # nothing there yet
    out.mkdir()
    train = write_tsv(out / "nli.tsv", ["premise", "hypothesis", "label"], nli_rows(40))
    assert main(_args(tiny_model, train, out, "--max-steps", "1", "--cache-dir", str(out / "cache"),
                      "--overwrite-output-dir")) == 0
    with caplog.at_level("WARNING"):
        assert main(_args(tiny_model, train, out, "--max-steps", "2", "--cache-dir", str(out / "cache"),
                          "--overwrite-output-dir")) == 0
    assert train.is_file() and (out / "cache").is_dir() and (out / "model.safetensors").is_file()
    assert any("an input of this run, stays" in r.getMessage() for r in caplog.records)
    aside = next(out.glob("superseded-*"))
    assert (aside / "model.safetensors").is_file() and not (aside / "nli.tsv").exists()


# ---- stop signals at every stage ---------------------------------------------------------------------


def test_sigterm_during_the_final_evaluation_saves_and_resume_auto_finishes(tmp_path, tiny_model, train_file, sts,
                                                                            monkeypatch, capsys):
    import mnr.train as train_mod

    out = tmp_path / "run"
    common = _args(tiny_model, train_file, out, "--eval-data", str(sts), "--max-steps", "3")
    _signal_on_call(monkeypatch, train_mod, "evaluate", 2)  # 1: before training, 2: the final evaluation
    assert main(common) == 128 + signal.SIGTERM
    printed = capsys.readouterr().out
    assert "SIGTERM received during the final evaluation: training is complete at step 3" in printed
    assert _names(out) == ["checkpoint-3", "metrics.jsonl", "mnr_run.json"]
    assert json.loads((out / "mnr_run.json").read_text())["finished"] is False
    monkeypatch.undo()
    assert main(common + ["--resume", "auto"]) == 0
    assert (out / "model.safetensors").is_file() and json.loads((out / "mnr_run.json").read_text())["finished"]
    assert "eval after training" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluations = [r["step"] for r in records if any(k.endswith("/spearman") for k in r)]
    assert evaluations == [0, 3]  # before training, and the final evaluation once (the stopped one is redone)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_before_training_stops_with_one_line_and_leaves_nothing(tmp_path, tiny_model, train_file, sts,
                                                                         monkeypatch, capsys, sig):
    import mnr.train as train_mod
    from mnr.store.build import Build

    out, cache = tmp_path / "run", tmp_path / "cache"
    if sig == signal.SIGTERM:  # in the token store build
        _signal_on_call(monkeypatch, Build, "read", 1, sig=sig)
    else:  # in the evaluation before training
        _signal_on_call(monkeypatch, train_mod, "evaluate", 1, sig=sig)
    assert main(_args(tiny_model, train_file, out, "--eval-data", str(sts), "--max-steps", "3",
                      "--cache-dir", str(cache))) == 128 + sig
    captured = capsys.readouterr()
    assert f"{signal.Signals(sig).name} received before training started: stopped at once; nothing was saved" \
        in captured.out and "Traceback" not in captured.err
    assert not out.exists()  # the dir this run created is gone with it
    assert [p.name for p in cache.iterdir() if not p.name.startswith("store-") or "." in p.name] == []


def test_sigterm_during_an_eval_steps_evaluation_or_a_save_stops_after_the_step(tmp_path, tiny_model, train_file,
                                                                                 sts, monkeypatch, capsys):
    import mnr.train as train_mod

    out = tmp_path / "run"
    _signal_on_call(monkeypatch, train_mod, "evaluate", 2)  # the evaluation at step 2
    assert main(_args(tiny_model, train_file, out, "--eval-data", str(sts), "--max-steps", "6",
                      "--eval-steps", "2")) == 128 + signal.SIGTERM
    assert "stopped after step 3; state saved in" in capsys.readouterr().out
    out = tmp_path / "run2"
    _signal_on_call(monkeypatch, train_mod, "save_checkpoint", 1, sig=signal.SIGHUP)
    assert main(_args(tiny_model, train_file, out, "--max-steps", "6", "--save-steps", "2")) == 128 + signal.SIGHUP
    assert "SIGHUP received: stopped after step 3" in capsys.readouterr().out
    assert _names(out)[:2] == ["checkpoint-2", "checkpoint-3"]


def test_a_signal_during_the_export_lets_it_finish(tmp_path, tiny_model, train_file, monkeypatch, capsys):
    import mnr.train as train_mod

    out = tmp_path / "run"
    _signal_on_call(monkeypatch, mnr.model, "save_model", 1)
    assert main(_args(tiny_model, train_file, out, "--max-steps", "2")) == 0
    assert "SIGTERM received during the export: the export completed, the run is finished" in capsys.readouterr().out
    assert json.loads((out / "mnr_run.json").read_text())["finished"] and (out / "model.safetensors").is_file()


def test_a_second_signal_stops_at_once_with_one_line(tmp_path, tiny_model, train_file, sts, monkeypatch, capsys):
    import mnr.train as train_mod

    out = tmp_path / "run"
    _signal_on_call(monkeypatch, train_mod, "evaluate", 2, sig=signal.SIGINT, times=2)
    assert main(_args(tiny_model, train_file, out, "--eval-data", str(sts), "--max-steps", "2",
                      "--save-steps", "1")) == 128 + signal.SIGINT
    captured = capsys.readouterr()
    assert f"SIGINT received again: stopped at once; the newest checkpoint is {out / 'checkpoint-2'}" in captured.out
    assert "Traceback" not in captured.err and not (out / "model.safetensors").exists()


@pytest.mark.slow
def test_ctrl_c_during_the_final_evaluation_of_a_real_process(tmp_path, tiny_model, train_file, sts):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, STAGE_WORKER, "sigint", "evaluate", "2", "--"]
                          + _args(tiny_model, train_file, out, "--eval-data", str(sts), "--max-steps", "2"),
                          capture_output=True, text=True, env=ENV, cwd=REPO, timeout=240)
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr[-2000:]
    assert "SIGINT received during the final evaluation" in proc.stdout and "Traceback" not in proc.stderr
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()


# ---- overwrite, resume elsewhere, a missing train file -------------------------------------------------


def test_a_dead_overwriting_run_never_passes_for_the_finished_one(tmp_path, tiny_model, train_file, monkeypatch,
                                                                  capsys):
    import mnr.train as train_mod

    out = tmp_path / "run"
    assert main(_args(tiny_model, train_file, out, "--max-steps", "2")) == 0
    other = write_tsv(tmp_path / "other.tsv", ["premise", "hypothesis", "label"], nli_rows(30))
    b_args = _args(tiny_model, other, out, "--max-steps", "3", "--save-steps", "1")

    def dies(*a, **k):  # run B dies as the process would, before its export
        raise RuntimeError("killed")

    monkeypatch.setattr(train_mod, "nonfinite_weights", dies)
    with pytest.raises(RuntimeError):
        main(b_args + ["--overwrite-output-dir"])
    assert not (out / "model.safetensors").exists() and not (out / "README.md").exists()
    assert (next(out.glob("superseded-*")) / "model.safetensors").is_file()
    assert json.loads((out / "mnr_run.json").read_text())["finished"] is False
    monkeypatch.undo()
    assert main(b_args) == 2
    assert "holds this run (pass --resume auto to continue it)" in capsys.readouterr().err
    assert main(b_args + ["--resume", "auto"]) == 0
    assert str(other) in (out / "README.md").read_text()


def test_resume_into_another_output_dir_starts_the_best_score_again(tmp_path, tiny_model, train_file, sts, caplog):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ("--eval-data", str(sts), "--max-steps", "4", "--eval-steps", "1", "--save-steps", "2")
    assert main(_args(tiny_model, train_file, a, *common)) == 0
    with caplog.at_level("INFO"):
        assert main(_args(tiny_model, train_file, b, *common, "--resume", str(a / "checkpoint-2"))) == 0
    assert (b / "best" / "model.safetensors").is_file()
    assert any("the best score starts again" in r.getMessage() for r in caplog.records)


def test_a_moved_train_file_is_named_missing_not_another_run(tmp_path, tiny_model, train_file, capsys):
    out = tmp_path / "run"
    assert main(_args(tiny_model, train_file, out, "--max-steps", "3", "--save-steps", "1")) == 0
    train_file.rename(tmp_path / "elsewhere.tsv")
    for extra in (["--resume", "auto"], []):
        assert main(_args(tiny_model, train_file, out, "--max-steps", "3", "--save-steps", "1", *extra)) == 2
        err = capsys.readouterr().err
        assert f"{train_file}: no such file (moved or deleted?)" in err and "--overwrite-output-dir" not in err


# ---- a full disk -------------------------------------------------------------------------------------


def _disk_full_after(monkeypatch, module, name: str, call: int, error=None):
    """module.name does its work, then (on call number `call`) fails as a full disk would."""
    real = getattr(module, name)
    calls = {"n": 0}

    def wrapper(*a, **k):
        calls["n"] += 1
        result = real(*a, **k)
        if calls["n"] == call:
            raise error or OSError(errno.ENOSPC, "No space left on device")
        return result

    monkeypatch.setattr(module, name, wrapper)


def test_disk_full_in_the_final_export_leaves_no_model_that_passes_for_finished(tmp_path, tiny_model, train_file,
                                                                               monkeypatch, capsys):
    import mnr.train as train_mod

    out = tmp_path / "run"
    args = _args(tiny_model, train_file, out, "--max-steps", "2", "--save-steps", "2")
    _disk_full_after(monkeypatch, mnr.model, "save_model", 2)  # 1: the checkpoint, 2: the final export
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: cannot write {out}: disk full (No space left on device)"
    assert _names(out) == ["checkpoint-2", "metrics.jsonl", "mnr_run.json"]
    monkeypatch.undo()
    assert main(args + ["--resume", "auto"]) == 0 and (out / "tokenizer.json").is_file()


def test_disk_full_in_a_checkpoint_or_best_is_one_line_and_leaves_nothing_partial(tmp_path, tiny_model, train_file,
                                                                                   sts, monkeypatch, capsys):
    import mnr.train as train_mod
    from safetensors import SafetensorError

    out = tmp_path / "run"
    full = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    _disk_full_after(monkeypatch, mnr.model, "save_model", 1, full)
    assert main(_args(tiny_model, train_file, out, "--max-steps", "2", "--save-steps", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: saving checkpoint-1 failed: cannot write {out / 'checkpoint-1'}: disk full")
    assert "Traceback" not in err and not list(out.glob("*.tmp"))
    out = tmp_path / "run2"
    _disk_full_after(monkeypatch, mnr.model, "save_model", 2)  # the second best/
    assert main(_args(tiny_model, train_file, out, "--eval-data", str(sts), "--max-steps", "4",
                      "--eval-steps", "1")) in (0, 2)
    assert not list(out.glob("best.*")) and not list(out.glob("export.tmp"))


@pytest.fixture()
def small_disk(tmp_path):
    """A 300 KiB tmpfs (as root; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_really_full_disk_gives_one_line_and_nothing_partial(tmp_path, tiny_model, train_file, small_disk, capsys):
    out = small_disk / "run"
    for extra in (["--save-steps", "1"], []):  # a checkpoint; the final export
        assert main(_args(tiny_model, train_file, out, "--max-steps", "1", "--cache-dir", str(tmp_path / "c"),
                          "--overwrite-output-dir", *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert "disk full" in err and "cannot write" in err and len(err.splitlines()) == 1, err
        assert not [p for p in out.iterdir() if p.name.endswith(".tmp") or p.name == "model.safetensors"]
        assert not (out / "mnr_run.json").exists() or not json.loads((out / "mnr_run.json").read_text())["finished"]


# ---- clutter -------------------------------------------------------------------------------------------


def test_failed_and_finished_runs_leave_no_lock_files_and_no_empty_dirs(tmp_path, tiny_model, train_file, capsys):
    out, cache = tmp_path / "new" / "run", tmp_path / "cache"
    assert main(_args(tiny_model, tmp_path / "missing.tsv", out, "--cache-dir", str(cache))) == 2
    assert not out.exists()
    kept = tmp_path / "existing"
    kept.mkdir()
    assert main(_args(tiny_model, tmp_path / "missing.tsv", kept)) == 2
    assert kept.is_dir() and _names(kept) == []
    assert main(_args(tiny_model, train_file, out, "--max-steps", "1", "--cache-dir", str(cache))) == 0
    assert not (out / ".mnr.lock").exists() and not list(cache.glob("*.lock"))


def test_a_lock_file_goes_on_release_and_a_waiter_takes_the_new_one(tmp_path):
    path = tmp_path / "x.lock"
    first, second = ExclusiveLock(path), ExclusiveLock(path)
    first.acquire()
    with pytest.raises(BlockingIOError):
        second.acquire(blocking=False)
    waiter = threading.Thread(target=second.acquire)
    waiter.start()
    time.sleep(0.2)
    first.release()  # the waiter gets the removed file's lock, sees it, locks the path anew
    waiter.join(5)
    assert second.is_locked and path.is_file()
    assert os.fstat(second.fd).st_ino == os.stat(path).st_ino
    third = ExclusiveLock(path)
    with pytest.raises(BlockingIOError):
        third.acquire(blocking=False)
    second.release()
    assert not path.exists()


def test_atomic_dir_and_staged_into_leave_the_old_contents_on_failure(tmp_path):
    target = tmp_path / "best"
    target.mkdir()
    (target / "a").write_text("old")
    with pytest.raises(WriteError, match=f"cannot write {target}: disk full"):
        with atomic_dir(target) as tmp:
            (tmp / "a").write_text("new")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert _names(tmp_path) == ["best"] and (target / "a").read_text() == "old"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("new")
    assert _names(tmp_path) == ["best"] and (target / "a").read_text() == "new"
    with pytest.raises(KeyboardInterrupt):
        with staged_into(tmp_path) as tmp:
            (tmp / "model").write_text("half")
            raise KeyboardInterrupt
    assert _names(tmp_path) == ["best"]
    with staged_into(tmp_path) as tmp:
        (tmp / "model").write_text("whole")
    assert _names(tmp_path) == ["best", "model"]


def test_a_signal_ignored_at_start_stays_ignored():
    from mnr.reporting import StopRequest

    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    try:
        before = signal.getsignal(signal.SIGTERM)
        stop = StopRequest()
        stop.install()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN and signal.getsignal(signal.SIGTERM) != before
        stop.restore()
        assert signal.getsignal(signal.SIGTERM) == before
    finally:
        signal.signal(signal.SIGHUP, previous)
