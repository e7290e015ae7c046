"""Data loading: every local format, NLI filtering and triplets, counted bad rows, clear errors."""

import gzip
import json

import pytest

from conftest import nli_rows, shared_file, write_tsv
from mnr.data import DataError, hub_spec, detect_schema, load_examples, read_local

NLI_HEADER = ["premise", "hypothesis", "label"]


def _write(path, header, rows, fmt):
    if fmt == "tsv":
        return write_tsv(path, header, rows)
    if fmt == "csv":
        import csv

        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(rows)
        return path
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(dict(zip(header, r))) + "\n" for r in rows), encoding="utf-8")
        return path
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({h: [r[i] for r in rows] for i, h in enumerate(header)}), path)
        return path
    raise AssertionError(fmt)


@pytest.mark.parametrize("fmt", ["tsv", "csv", "jsonl", "parquet"])
@pytest.mark.parametrize("gz", [False, True])
def test_every_format_reads_the_same_examples(tmp_path, fmt, gz):
    rows = nli_rows(5) + [['a "quoted" premise', 'a "quoted" hypothesis', "entailment"]]
    path = _write(tmp_path / f"d.{fmt}", NLI_HEADER, rows, fmt)
    if gz and fmt != "parquet":
        gz_path = tmp_path / f"d.{fmt}.gz"
        gz_path.write_bytes(gzip.compress(path.read_bytes()))
        path = gz_path
    ex, stats = load_examples(str(path), hard_negatives=False)
    assert len(ex) == 6 and ex.all_negatives is None
    assert ex.anchors[-1] == 'a "quoted" premise' and ex.positives[-1] == 'a "quoted" hypothesis'
    assert stats.skipped["neutral (not used)"] == 5


def test_nli_keeps_only_entailment_and_counts_the_rest(tmp_path):
    rows = [["p1", "h1", "entailment"], ["p1", "h2", "neutral"], ["p1", "h3", "contradiction"],
            ["p2", "h4", "0"], ["p2", "h5", "-1"], ["p2", "h6", "-"], ["p3", "h7", "2"], ["p3", "h8", "1"],
            ["p4", "h9", "maybe"], ["", "h10", "entailment"], ["p5", "   ", "entailment"]]
    path = write_tsv(tmp_path / "n.tsv", NLI_HEADER, rows)
    ex, stats = load_examples(str(path), hard_negatives=False)
    assert list(zip(ex.anchors, ex.positives)) == [("p1", "h1"), ("p2", "h4")]
    assert stats.skipped["no gold label (-1/-)"] == 2
    assert stats.skipped["unknown label"] == 1
    assert stats.skipped["empty or missing text"] == 2
    assert stats.rows == 11 and stats.examples == 2


def test_triplets_group_hypotheses_by_premise(tmp_path):
    rows = [["p1", "e1", "entailment"], ["p1", "e2", "entailment"], ["p1", "c1", "contradiction"],
            ["p2", "e3", "entailment"], ["p2", "c2", "contradiction"], ["p2", "c3", "contradiction"],
            ["p3", "e4", "entailment"]]  # p3 has no contradiction: dropped, counted
    ex, stats = load_examples(str(write_tsv(tmp_path / "t.tsv", NLI_HEADER, rows)), hard_negatives=True)
    assert list(zip(*ex.columns())) == [("p1", "e1", "c1"), ("p1", "e2", "c1"),
                                                                 ("p2", "e3", "c2")]
    assert stats.skipped["no contradiction for premise"] == 1


def test_pair_and_triplet_columns(tmp_path):
    pairs = write_tsv(tmp_path / "p.tsv", ["anchor", "positive"], [["a", "b"], ["c", "d"], ["e", ""]])
    ex, stats = load_examples(str(pairs), hard_negatives=False)
    assert ex.anchors == ["a", "c"] and stats.skipped["empty or missing text"] == 1
    with pytest.raises(DataError, match="negative"):
        load_examples(str(pairs), hard_negatives=True)
    trip = write_tsv(tmp_path / "t.tsv", ["anchor", "positive", "negative"], [["a", "b", "c"], ["d", "e", "f"]])
    ex, _ = load_examples(str(trip), hard_negatives=True)
    assert ex.columns()[2] == ["c", "f"]
    ex, _ = load_examples(f"{pairs},{trip}", hard_negatives=False)  # several sources, comma separated
    assert len(ex) == 4


def test_wrong_columns_lists_found_and_expected(tmp_path):
    path = write_tsv(tmp_path / "w.tsv", ["question", "answer"], [["q", "a"]])
    with pytest.raises(DataError) as err:
        load_examples(str(path), hard_negatives=False)
    msg = str(err.value)
    assert "question, answer" in msg and "premise, hypothesis, label" in msg and "anchor, positive" in msg


def test_empty_missing_and_non_utf8_files(tmp_path):
    empty = tmp_path / "e.tsv"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        load_examples(str(empty), hard_negatives=False)
    with pytest.raises(DataError, match="no such file"):
        load_examples(str(tmp_path / "missing.tsv"), hard_negatives=False)
    bad = tmp_path / "b.tsv"
    bad.write_bytes(b"anchor\tpositive\nfa\xe7ade\tfront\n")
    with pytest.raises(DataError, match="UTF-8"):
        load_examples(str(bad), hard_negatives=False)


def test_malformed_rows_are_counted_not_shifted(tmp_path):
    path = tmp_path / "m.tsv"
    path.write_text("anchor\tpositive\na\tb\nc\td\textra\ne\n", encoding="utf-8")
    ex, stats = load_examples(str(path), hard_negatives=False)
    assert ex.anchors == ["a"]
    assert stats.skipped["malformed row (more fields than the header)"] == 1
    assert stats.skipped["empty or missing text"] == 1


def test_identical_anchor_and_positive_is_skipped(tmp_path):
    path = write_tsv(tmp_path / "s.tsv", ["anchor", "positive"], [["a", "a"], ["b", "c"]])
    ex, stats = load_examples(str(path), hard_negatives=False)
    assert ex.anchors == ["b"] and stats.skipped["same text twice in one example"] == 1


def test_no_usable_rows_is_an_error(tmp_path):
    path = write_tsv(tmp_path / "n.tsv", NLI_HEADER, [["p", "h", "neutral"]])
    with pytest.raises(DataError, match="no usable examples"):
        load_examples(str(path), hard_negatives=False)


def test_hub_names_are_parsed_and_errors_are_clear(monkeypatch):
    assert hub_spec("snli") == ("snli", None, "train")
    assert hub_spec("glue/mnli") == ("glue", "mnli", "train")
    assert hub_spec("sentence-transformers/all-nli:triplet@dev") == ("sentence-transformers/all-nli", "triplet", "dev")
    import datasets

    calls = []

    def fake_load(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_dict({"premise": ["p"], "hypothesis": ["h"], "label": [0]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    ex, _ = load_examples("snli,glue/mnli", hard_negatives=False)
    assert calls == [("snli", None, "train"), ("glue", "mnli", "train")] and len(ex) == 2

    def offline(*a, **k):
        raise ConnectionError("offline mode is enabled")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="neither a local file nor a loadable hub dataset"):
        load_examples("snli", hard_negatives=False)


def test_schema_detection():
    assert detect_schema("x", ["premise", "hypothesis", "label", "idx"]) == "nli"
    assert detect_schema("x", ["anchor", "positive"]) == "pair"
    assert detect_schema("x", ["anchor", "positive", "negative"]) == "triplet"


def test_a_directory_is_named_as_one_with_the_files_mnr_can_read(tmp_path):
    write_tsv(tmp_path / "a.tsv", NLI_HEADER, nli_rows(2))
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(b'{"anchor": "a", "positive": "b"}\n'))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"is a directory.*a\.tsv, b\.jsonl\.gz") as err:
        load_examples(str(tmp_path), hard_negatives=False)
    assert "notes.txt" not in str(err.value)
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError, match="is a directory.*holds no file"):
        load_examples(str(tmp_path / "sub"), hard_negatives=False)


def test_an_error_late_in_a_streamed_file_still_names_the_file(tmp_path):
    bad = tmp_path / "late.tsv"
    bad.write_bytes(b"anchor\tpositive\n" + b"a b\tc d\n" * 20000 + b"fa\xe7ade\tfront\n")
    with pytest.raises(DataError, match="late.tsv: not UTF-8"):
        load_examples(str(bad), hard_negatives=False)
    broken = tmp_path / "late.jsonl"
    broken.write_text('{"anchor": "a", "positive": "b"}\n' * 150 + "{oops\n")
    with pytest.raises(DataError, match="late.jsonl:151: not valid JSON"):
        load_examples(str(broken), hard_negatives=False)


def test_shared_snli_files_read_without_quote_processing():
    path = shared_file("nli/snli_train-subset.tsv.gz")
    columns, rows = read_local(str(path))
    assert columns == NLI_HEADER
    assert sum(1 for _ in rows) == 7480
    ex, stats = load_examples(str(path), hard_negatives=False)
    # 2474 entailment rows; 4 of them have hypothesis == premise (no signal, skipped and counted)
    assert len(ex) == 2470 and stats.skipped["same text twice in one example"] == 4
    assert stats.skipped.get("malformed row (more fields than the header)", 0) == 0


def test_text_that_is_not_valid_unicode_is_a_counted_skip_in_training_and_evaluation_data(tmp_path):
    """A JSON "\\ud800" escape decodes to a lone surrogate, which no tokenizer or hash takes: the row is skipped
    and counted under its own reason (it was a traceback)."""
    from mnr.evaluate import load_sts

    pairs = tmp_path / "p.jsonl"
    pairs.write_text('{"anchor": "a man \\ud800 plays", "positive": "a person plays"}\n'
                     '{"anchor": "caf\\u00e9 au lait", "positive": "coffee"}\n'
                     '{"anchor": "x", "positive": "y"}\n', encoding="utf-8")
    ex, stats = load_examples(str(pairs), False)
    assert ex.anchors == ["café au lait", "x"]
    assert dict(stats.skipped) == {"text not valid Unicode (a lone surrogate)": 1}
    nli = tmp_path / "n.jsonl"
    nli.write_text('{"premise": "p \\udc00", "hypothesis": "h", "label": 0}\n'
                   '{"premise": "p", "hypothesis": "h", "label": 0}\n', encoding="utf-8")
    _, stats = load_examples(str(nli), False)
    assert stats.skipped["text not valid Unicode (a lone surrogate)"] == 1 and stats.examples == 1
    sts = tmp_path / "s.jsonl"
    sts.write_text("".join(json.dumps({"sentence1": a, "sentence2": "b", "score": i}) + "\n"
                           for i, a in enumerate(["a \ud800", "one", "two"])), encoding="utf-8")
    data = load_sts(str(sts))
    assert data.sentences1 == ["one", "two"] and data.skipped == 1
