"""Inputs of the wrong shape, environment values and messages: every bad input is a counted skip or one clear
line, never a silently wrong result, a traceback, or advice that does not apply."""

import csv
import gzip
import json
import logging
import os
import subprocess
import sys

import pytest

from conftest import REPO, WORDS, train_args, write_tsv
from mnr.data import DataError, load_examples, read_local

PAIRS = [(f"a man {WORDS[i % len(WORDS)]} {i} is here", f"a person {i} plays") for i in range(48)]


def _lines(path, lines, encoding="utf-8", newline="\n"):
    path.write_text("".join(line + newline for line in lines), encoding=encoding, newline="")
    return path


def _jsonl(path, rows):
    return _lines(path, [r if isinstance(r, str) else json.dumps(r) for r in rows])


def _pairs_file(path, **kw):
    return _lines(path, ["anchor\tpositive"] + [f"{a}\t{p}" for a, p in PAIRS], **kw)


# ---------------------------------------------------------------------------------------------
# a column named twice


def _duplicate_columns(tmp_path, kind):
    rows = [(a, p, f"other {i}") for i, (a, p) in enumerate(PAIRS)]
    if kind == "csv":
        return _lines(tmp_path / "d.csv", ["anchor,positive,positive"] + [",".join(r) for r in rows])
    if kind == "tsv":
        return _lines(tmp_path / "d.tsv", ["anchor\tpositive\t positive"] + ["\t".join(r) for r in rows])
    if kind == "jsonl":
        return _lines(tmp_path / "d.jsonl", [f'{{"anchor": "{a}", "positive": "{p}", "positive": "{o}"}}'
                                             for a, p, o in rows])
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_arrays([pa.array(list(c)) for c in zip(*rows)],
                                        names=["anchor", "positive", "positive"]), path)
    return path


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl", "parquet"])
def test_a_column_named_twice_is_refused_naming_it_in_every_reader(tmp_path, kind):
    path = _duplicate_columns(tmp_path, kind)
    with pytest.raises(DataError, match=r"'positive' appears (2 times in the header|twice in one object)"):
        load_examples(str(path), None)


def test_a_column_named_twice_is_refused_in_evaluation_sets_too(tmp_path):
    from mnr.evaluate import build_evaluators, load_sts

    sts = _lines(tmp_path / "sts.tsv", ["sentence1\tsentence2\tscore\tscore"] +
                 [f"{a}\t{p}\t{i % 5}\t1" for i, (a, p) in enumerate(PAIRS)])
    with pytest.raises(DataError, match="'score' appears 2 times"):
        load_sts(str(sts))
    with pytest.raises(DataError, match="'positive' appears 2 times"):
        build_evaluators(str(_duplicate_columns(tmp_path, "csv")), 32, 8)


def test_unnamed_columns_from_trailing_delimiters_may_repeat(tmp_path):
    path = _lines(tmp_path / "t.csv", ["anchor,positive,,"] + [f"{a},{p},," for a, p in PAIRS])
    examples, _ = load_examples(str(path), None)
    assert examples.positives[:2] == [PAIRS[0][1], PAIRS[1][1]]


# ---------------------------------------------------------------------------------------------
# rows and fields of the wrong shape


def test_jsonl_lines_that_are_not_objects_are_counted_skips(tmp_path):
    rows = [{"anchor": a, "positive": p} for a, p in PAIRS]
    path = _jsonl(tmp_path / "m.jsonl", rows[:3] + ["[1, 2]", "5", '"text"', "null"] + rows[3:])
    examples, stats = load_examples(str(path), None)
    assert len(examples) == len(PAIRS)
    assert stats.skipped == {"line not a JSON object (a list)": 1, "line not a JSON object (a number)": 1,
                             "line not a JSON object (a string)": 1, "line not a JSON object (null)": 1}


@pytest.mark.parametrize("first", ['["a man", "a person"]', "7"])
def test_a_jsonl_file_without_objects_is_one_line(tmp_path, first):
    path = _lines(tmp_path / "l.jsonl", [first] * 3)
    with pytest.raises(DataError, match=r"none of its first 3 lines is a JSON object .*one object per line"):
        read_local(str(path))


def test_fields_that_are_not_text_are_counted_skips_with_their_reason(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"anchor": a, "positive": p} for a, p in PAIRS]
    bad = [{"anchor": "x", "positive": {"text": "y"}}, {"anchor": ["x"], "positive": "y"}, {"anchor": 3, "positive": "y"},
           {"anchor": "x", "positive": "y", "negatives": [1, 2]}, {"anchor": "", "positive": "y"}]
    examples, stats = load_examples(str(_jsonl(tmp_path / "f.jsonl", rows + bad[:3] + bad[4:])), None)
    assert len(examples) == len(PAIRS)
    assert stats.skipped == {"field not text (a number, list or object)": 3, "empty or missing text": 1}
    negs = [{**r, "negatives": [f"no {i}"]} for i, r in enumerate(rows)] + [bad[3]]
    _, stats = load_examples(str(_jsonl(tmp_path / "n.jsonl", negs)), None)
    assert stats.skipped == {"field not text (a number, list or object)": 1}
    ints = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"anchor": list(range(48)), "positive": [p for _, p in PAIRS]}), ints)
    with pytest.raises(DataError, match=r"48 field not text \(a number, list or object\)"):
        load_examples(str(ints), None)


@pytest.mark.parametrize("label", [[0], {"x": 0}, True, 0.5])
def test_an_nli_label_of_the_wrong_type_is_an_unknown_label_in_training_and_evaluation(tmp_path, label):
    from mnr.evaluate import build_evaluators

    rows = [{"premise": a, "hypothesis": p, "label": 0} for a, p in PAIRS]
    rows += [{"premise": a, "hypothesis": f"not {p}", "label": label} for a, p in PAIRS[:5]]
    path = _jsonl(tmp_path / "nli.jsonl", rows)
    _, stats = load_examples(str(path), False)
    assert stats.skipped["unknown label"] == 5
    (ev,) = build_evaluators(str(path), 32, 8)
    assert ev.data.skipped["rows with empty text or no usable label"] == 5


def test_a_beir_record_that_is_not_an_object_names_its_line(tmp_path):
    from mnr.retrieval import load_beir

    folder = tmp_path / "beir"
    (folder / "qrels").mkdir(parents=True)
    _jsonl(folder / "corpus.jsonl", [{"_id": "d1", "text": "a dog"}, "[1]"])
    _jsonl(folder / "queries.jsonl", [{"_id": "q1", "text": "dog"}])
    _lines(folder / "qrels" / "test.tsv", ["query-id\tcorpus-id\tscore", "q1\td1\t1"])
    with pytest.raises(DataError, match=r"corpus.jsonl: record 2: line not a JSON object \(a list\)"):
        load_beir(str(folder))


# ---------------------------------------------------------------------------------------------
# encodings, line ends and files that are not what their name says


@pytest.mark.parametrize("variant", ["byte-order mark", "CRLF", "gzip"])
def test_a_byte_order_mark_crlf_line_ends_and_gzip_read_like_a_plain_file(tmp_path, variant):
    plain, _ = load_examples(str(_pairs_file(tmp_path / "plain.tsv")), None)
    if variant == "gzip":
        path = tmp_path / "p.tsv.gz"
        path.write_bytes(gzip.compress((tmp_path / "plain.tsv").read_bytes()))
    else:
        path = _pairs_file(tmp_path / "p.tsv", **({"encoding": "utf-8-sig"} if variant == "byte-order mark"
                                                  else {"newline": "\r\n"}))
    examples, _ = load_examples(str(path), None)
    assert (examples.anchors, examples.positives) == (plain.anchors, plain.positives)


@pytest.mark.parametrize("name, content, message", [
    ("empty.tsv", "", "file is empty"),
    ("header.tsv", "anchor\tpositive\n", r"no usable examples \(0 rows read"),
    ("fake.tsv.gz", "anchor\tpositive\n", "cannot read .*Not a gzipped file"),
    ("fake.parquet", "anchor\tpositive\n", "cannot read as Parquet"),
    ("empty.jsonl", "\n\n", "file is empty"),
    ("dir.tsv", None, "is a directory, not a data file"),
    ("pairs.txt", "anchor\tpositive\n", "unknown format '.txt'"),
])
def test_files_that_are_not_what_their_name_says_are_one_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.mkdir() if content is None else path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_examples(str(path), None)


def test_a_utf16_file_is_named_as_such(tmp_path):
    path = tmp_path / "excel.tsv"
    path.write_text("anchor\tpositive\na\tb\n", encoding="utf-16")
    with pytest.raises(DataError, match="excel.tsv: not UTF-8 text \\(it starts with a UTF-16 byte-order mark\\)"):
        load_examples(str(path), None)


def test_one_very_long_text_in_a_tsv_is_a_counted_skip_and_the_rows_after_it_are_read(tmp_path):
    limit = csv.field_size_limit()
    lines = [f"{a}\t{p}" for a, p in PAIRS]
    path = _lines(tmp_path / "long.tsv", ["anchor\tpositive"] + lines[:10] + ["a\t" + "b " * limit] + lines[10:])
    examples, stats = load_examples(str(path), None)
    assert len(examples) == len(PAIRS) and examples.anchors[-1] == PAIRS[-1][0]
    assert stats.skipped == {f"text longer than {limit} characters (the csv field size limit)": 1}


def test_a_field_beyond_the_limit_in_a_csv_names_the_limit_and_both_causes(tmp_path):
    path = _lines(tmp_path / "long.csv", ["anchor,positive"] + [f"{a},{p}" for a, p in PAIRS]
                  + ["a," + "b" * (csv.field_size_limit() + 1)])
    with pytest.raises(DataError, match=r"long.csv:\d+: a field longer than \d+ characters \(the csv field size "
                                        r"limit\): a '\"' that opens a quoted field .* or one text that long"):
        load_examples(str(path), None)


# ---------------------------------------------------------------------------------------------
# environment values


def test_a_bad_environment_value_never_breaks_the_import_and_is_one_line_naming_the_variable(tmp_path, monkeypatch):
    from mnr.data import env_int

    env = dict(os.environ, PYTHONPATH=str(REPO), MNR_TOKENISE_CHUNK="lots")
    proc = subprocess.run([sys.executable, "-c", "import mnr.store, mnr.train, mnr.evaluate, mnr.mine"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for value in ("lots", "0", "-3", "2.5"):
        monkeypatch.setenv("MNR_TOKENISE_CHUNK", value)
        with pytest.raises(DataError, match=f"environment variable MNR_TOKENISE_CHUNK='{value}' is not an integer"):
            env_int("MNR_TOKENISE_CHUNK", 20_000)
    monkeypatch.setenv("MNR_TOKENISE_CHUNK", " 7 ")
    assert env_int("MNR_TOKENISE_CHUNK", 20_000) == 7


def test_a_bad_tokenise_chunk_stops_training_with_one_line(tmp_path, tiny_model, monkeypatch, capsys):
    from mnr.train import main

    monkeypatch.setenv("MNR_TOKENISE_CHUNK", "lots")
    pairs = _pairs_file(tmp_path / "p.tsv")
    assert main(train_args(tiny_model, pairs, tmp_path / "out", "--max-steps", "1", "--eval-data", "none",
                           "--cache-dir", str(tmp_path / "c"))) == 2
    assert "error: environment variable MNR_TOKENISE_CHUNK='lots'" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # refused before the store is built


def test_the_cache_dir_variable_expands_the_home_dir(monkeypatch, tmp_path):
    from mnr.data import default_cache_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MNR_CACHE", "~/stores")
    assert default_cache_dir() == str(tmp_path / "stores")


def test_the_test_session_never_uses_the_users_cache():
    from mnr.data import default_cache_dir

    home_cache = os.path.join(os.path.expanduser("~"), ".cache", "mnr")
    assert not os.path.abspath(default_cache_dir()).startswith(home_cache)
    assert os.environ["MNR_CACHE"] == __import__("conftest").SESSION_CACHE


# ---------------------------------------------------------------------------------------------
# trackers, JSON output


def test_a_tracker_that_is_not_installed_is_refused_at_start_saying_what_to_install(tmp_path, tiny_model,
                                                                                    monkeypatch, capsys):
    import accelerate.utils

    from mnr.launch import LaunchError, resolve_tracker
    from mnr.train import main

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    monkeypatch.setattr(accelerate.utils, "is_tensorboard_available", lambda: False)
    for name in ("wandb", "tensorboard"):
        with pytest.raises(LaunchError, match=f"--report-to {name}: the {name} package is not installed; pip install"):
            resolve_tracker(name)
    with pytest.raises(LaunchError, match="--report-to all: no tracker is installed"):
        resolve_tracker("all")
    assert resolve_tracker("auto") == "none" and resolve_tracker("none") == "none"
    out = tmp_path / "out"
    assert main(train_args(tiny_model, _pairs_file(tmp_path / "p.tsv"), out, "--report-to", "wandb")) == 2
    assert "pip install wandb" in capsys.readouterr().err and not out.exists()


def _strict_json(text: str):
    def refuse(constant):
        raise AssertionError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_evaluate_json_is_valid_json_with_null_for_a_score_that_is_not_a_number(tmp_path, tiny_model, capsys):
    from mnr.evaluate import main

    constant = _lines(tmp_path / "flat.tsv", ["sentence1\tsentence2\tscore"] +
                      [f"{a}\t{p}\t3" for a, p in PAIRS[:10]])  # equal gold scores: Spearman is NaN
    with pytest.warns(Warning, match="constant"):
        assert main([str(tiny_model), "--data", str(constant), "--json", "--max-seq-length", "32"]) == 0
    result = _strict_json(capsys.readouterr().out)
    assert result["results"]["flat"]["spearman"] is None


def test_the_metrics_log_writes_null_for_nan(tmp_path):
    from mnr.reporting import MetricsLog

    class NoTrackers:
        trackers = []

    log = MetricsLog(NoTrackers(), tmp_path / "metrics.jsonl")
    log.write({"step": 1, "loss": float("nan"), "scores": {"a": float("inf"), "b": 0.5}})
    assert _strict_json((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": None,
                                                                      "scores": {"a": None, "b": 0.5}}


# ---------------------------------------------------------------------------------------------
# a run that cannot change the weights; the start-up lines


def test_the_schedule_warning_names_the_steps_and_the_warm_up():
    from mnr.train import lr_steps, schedule_warning

    assert "1 optimizer step with a warm-up of 1 step" in schedule_warning(1, 1)
    assert "0 optimizer steps" in schedule_warning(0, 0)
    assert schedule_warning(1, 0) is None and schedule_warning(2, 1) is None and schedule_warning(100, 10) is None
    assert [lr_steps(n, 1) for n in range(3)] == [0, 0, 1] and lr_steps(3, 0) == 3


def test_a_run_that_cannot_change_the_weights_says_so_at_start_and_in_the_card(tmp_path, tiny_model, caplog):
    from conftest import load_weights, max_abs_diff
    from mnr.train import main

    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="mnr"):
        assert main(train_args(tiny_model, _pairs_file(tmp_path / "p.tsv"), out, "--batch-size", "32",
                               "--eval-data", "none", "--cache-dir", str(tmp_path / "c"))) == 0
    warning = next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                   and "cannot change the weights" in r.getMessage())
    assert "1 optimizer step with a warm-up of 1 step" in warning and "--warmup-ratio 0" in warning
    # the start-up line counts in the singular where it is one
    assert "48 examples -> 1 global batch of 32 per epoch (16 wait for" in caplog.text
    assert "; 1 step; 1 process x 32" in caplog.text
    saved, base = load_weights(out), load_weights(tiny_model)
    shared = saved.keys() & base.keys()  # the export adds the (untrained) pooler head
    assert shared and max_abs_diff({k: saved[k] for k in shared}, {k: base[k] for k in shared}) == 0
    assert "The weights are the base model's, unchanged" in (out / "README.md").read_text()


def test_a_missing_data_file_is_named_before_anything_is_built_or_created(tmp_path, tiny_model, caplog, capsys):
    from mnr.train import main

    pairs = _pairs_file(tmp_path / "p.tsv")
    for train, evaluation in ((tmp_path / "moved.tsv", "none"), (pairs, str(tmp_path / "dev.tsv"))):
        out = tmp_path / "out"
        caplog.clear()
        with caplog.at_level(logging.INFO):
            assert main(train_args(tiny_model, train, out, "--eval-data", evaluation)) == 2
        missing = train if evaluation == "none" else evaluation
        assert f"error: {missing}: no such file" in capsys.readouterr().err
        assert "token store" not in caplog.text and not out.exists()


# ---------------------------------------------------------------------------------------------
# the card, the README's paths


def test_the_card_has_intended_use_and_limitations_and_the_demo_card_names_its_data():
    from mnr.card import EMBEDDED_TRAIN_DATA, model_card

    card = model_card({**EMBEDDED_TRAIN_DATA, "examples": 3167, "steps": 98, "max_seq_length": 128})
    assert "SNLI 1.0 dev split" in card and "- Data license: CC BY-SA 4.0" in card
    assert "## Intended use" in card and "## Limitations" in card and "truncated" in card
    assert "3167 training examples" in card  # a small fine-tune says so
    assert "unchanged" not in card
    assert "3167 training examples" not in model_card({"examples": 500_000})


def test_the_readmes_example_output_dir_is_not_committed():
    proc = subprocess.run(["git", "check-ignore", "-q", "out/mine/model.safetensors"], cwd=REPO)
    assert proc.returncode == 0
