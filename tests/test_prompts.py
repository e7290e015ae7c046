"""Prompts (--query-prompt / --document-prompt) and pooling (--pooling mean|cls|lasttoken): the token store, the
export and the evaluators agree with sentence-transformers loading the export (issue 13)."""

import json
import logging

import numpy as np
import pytest
import torch

from conftest import train_args, write_tsv
from mnr.backbone import Backbone
from mnr.batching import Collator
from mnr.model import ModelError, choose_pipeline, last_token_pool, load_encoder, save_model
from mnr.store import prepare_train_store, store_fingerprint
from test_model import TEXTS, st_base

PROMPTS = ("query: ", "passage: ")


def _pairs(tmp_path):
    return write_tsv(tmp_path / "pairs.tsv", ["anchor", "positive", "negative"], [
        ["a man is playing", "a dog is running outside", "the red car"],
        ["two children sitting", "a man is playing", "a blue house near the tree"],  # a query as a document too
        ["a girl is eating", "a girl is eating", "a cat is sleeping"],  # the same text twice: skipped
    ])


def test_last_token_pool_finds_the_last_real_token_on_either_padding_side():
    hidden = torch.randn(3, 5, 4)
    right = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    assert torch.equal(last_token_pool(hidden, right), hidden[[0, 1, 2], [4, 1, 2]])
    left = right.flip(1)  # the same lengths padded on the left: the last column is every row's last token
    assert torch.equal(last_token_pool(hidden, left), hidden[:, 4])


def test_length_buckets_leave_a_left_padded_batch_whole(tiny_model):
    encoder, tok = load_encoder(str(tiny_model))
    choose_pipeline(encoder, "lasttoken")
    tok.padding_side = "left"
    batch = tok(TEXTS * 2, padding=True, return_tensors="pt")
    assert batch["attention_mask"][:, 0].eq(0).any()
    with torch.no_grad():
        whole = encoder(batch["input_ids"], batch["attention_mask"])
        encoder.length_buckets = 2
        assert (encoder(batch["input_ids"], batch["attention_mask"]) - whole).abs().max() < 1e-6


def test_the_store_prompts_queries_and_documents_before_hashing_and_tokenising(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    plain = prepare_train_store(str(_pairs(tmp_path)), tok, 32, True, str(tmp_path / "cache"))
    store = prepare_train_store(str(_pairs(tmp_path)), tok, 32, True, str(tmp_path / "cache"), PROMPTS)
    assert store.path != plain.path  # the prompts are in the fingerprint
    # "a man is playing" and "a girl is eating" are queries and documents: one id each without prompts, two with
    assert plain.n_texts == 7 and store.n_texts == 9
    assert len(store) == len(plain) == 2  # the query equal to its positive is still found and skipped
    assert store.stats.summary() == plain.stats.summary() == \
        "3 rows read, 2 examples kept; skipped: 1 same text twice in one example"

    def text(t):
        return tok.decode(store.token_ids[t], skip_special_tokens=True)

    rows = store.text_ids.tolist()
    assert [text(t) for t in rows[0]] == ["query : a man is playing", "passage : a dog is running outside",
                                          "passage : the red car"]
    assert text(rows[1][1]) == "passage : a man is playing" and rows[1][1] != rows[0][0]
    # the sampler's "no text twice in a global batch" compares bare texts: both forms of "a man is playing" clash
    bare = store.same_text_ids()
    assert bare[1][1] == bare[0][0] and len({*bare[0], *bare[1]}) == 5
    assert plain.same_text_ids() is plain.text_ids
    # the prompt counts in max_seq_length; same prompts for both roles: one id per text, as without prompts
    short = prepare_train_store(str(_pairs(tmp_path)), tok, 4, True, str(tmp_path / "cache"), PROMPTS)
    assert short.token_ids[0].tolist() == tok("query: a man is playing", truncation=True, max_length=4)["input_ids"]
    assert tok.decode(short.token_ids[0], skip_special_tokens=True) == "qu"  # only the prompt's first tokens
    same = prepare_train_store(str(_pairs(tmp_path)), tok, 32, True, str(tmp_path / "cache"), ("x ", "x "))
    assert same.n_texts == 7
    assert store_fingerprint([], True, tok, 32)[0] == store_fingerprint([], True, tok, 32, ("", ""))[0]


@pytest.mark.parametrize("pooling", ["mean", "cls", "lasttoken"])
def test_sentence_transformers_gives_the_trainers_embeddings_for_each_pooling_and_prompt(tmp_path, tiny_model,
                                                                                          pooling):
    """Anchors and positives exactly as training embeds them (store -> collator -> encoder) against the
    export loaded by sentence-transformers, with prompt_name="query" / "document"."""
    from sentence_transformers import SentenceTransformer

    encoder, tok = load_encoder(str(tiny_model))
    choose_pipeline(encoder, pooling, *PROMPTS)
    store = prepare_train_store(str(_pairs(tmp_path)), tok, 32, True, str(tmp_path / "cache"), PROMPTS)
    batch = Collator(store.token_ids, store.text_ids, tok.pad_token_id)(np.arange(len(store)))
    encoder.length_buckets = 2
    with torch.no_grad():
        ours = encoder(batch["input_ids"], batch["attention_mask"]).reshape(3, len(store), -1)  # role-major
    save_model(encoder, tok, tmp_path / "out", 32)
    config = json.loads((tmp_path / "out" / "config_sentence_transformers.json").read_text())
    assert config["prompts"] == {"query": "query: ", "document": "passage: "} and config["default_prompt_name"] is None
    pooling_config = json.loads((tmp_path / "out" / "1_Pooling" / "config.json").read_text())
    assert [k for k, v in pooling_config.items() if v is True] == [{"mean": "pooling_mode_mean_tokens", "cls":
                                                                   "pooling_mode_cls_token", "lasttoken":
                                                                   "pooling_mode_lasttoken"}[pooling]]
    st = SentenceTransformer(str(tmp_path / "out"), device="cpu")
    queries = ["a man is playing", "two children sitting"]
    documents = ["a dog is running outside", "a man is playing"]
    assert (torch.from_numpy(st.encode(queries, prompt_name="query")) - ours[0]).abs().max() < 1e-5
    assert (torch.from_numpy(st.encode(documents, prompt_name="document")) - ours[1]).abs().max() < 1e-5
    assert (torch.from_numpy(st.encode_document(documents)) - ours[1]).abs().max() < 1e-5


def test_default_pooling_and_prompts_follow_the_base_and_an_override_warns(tiny_model, tmp_path, caplog):
    from mnr.model import pipeline_choices, read_pipeline

    base = st_base(tiny_model, tmp_path / "base", pooling="cls")  # its prompts: {"query": "query: "}
    encoder, _ = load_encoder(str(base))
    choose_pipeline(encoder)
    assert (encoder.pipeline.pooling, encoder.pipeline.query_prompt, encoder.pipeline.document_prompt) == \
        ("cls", "query: ", "")
    with caplog.at_level(logging.WARNING, logger="mnr.model"):
        choose_pipeline(encoder, "mean", "", "doc: ")
    assert "pooling='mean' differs from the base model's own 'cls'" in caplog.text
    assert (encoder.pipeline.pooling, encoder.pipeline.query_prompt, encoder.pipeline.document_prompt) == \
        ("mean", "", "doc: ")
    plain = pipeline_choices(read_pipeline(str(tiny_model)))
    assert plain == {"pooling": "mean", "query_prompt": "", "document_prompt": "", "include_prompt": True}
    with pytest.raises(ModelError, match="pooling='max' is invalid"):
        choose_pipeline(encoder, "max")
    encoder.pipeline.include_prompt = False  # a base that leaves its prompt out keeps doing so; a flag overrides
    choose_pipeline(encoder, "", "query: ")
    assert encoder.pipeline.include_prompt is False
    choose_pipeline(encoder, "", "query: ", include_prompt=True)
    assert encoder.pipeline.include_prompt is True


def test_evaluators_prompt_queries_and_documents_and_both_sts_sides_with_the_query_prompt(tiny_model, tmp_path):
    """An evaluator on a prompted encoder scores exactly what the bare encoder scores on prompted texts."""
    import dataclasses

    from mnr.evaluate import build_evaluators

    backbone = Backbone.load(str(tiny_model))
    dev = write_tsv(tmp_path / "dev.tsv", ["anchor", "positive"],
                    [["a man is playing", "a dog is running"], ["two children sitting", "the red car"],
                     ["a girl is eating", "a cat is sleeping"]])
    sts = write_tsv(tmp_path / "sts.tsv", ["sentence1", "sentence2", "score"],
                    [["a man is playing", "a man plays", "5"], ["a dog runs", "the red car", "0"],
                     ["two children", "a boy and a girl", "3"]])
    retrieval, sts_ev = build_evaluators(f"{dev},{sts}", 32)
    q, d = PROMPTS
    by_hand = [dataclasses.replace(retrieval, data=dataclasses.replace(
                   retrieval.data, queries=[q + t for t in retrieval.data.queries],
                   corpus=[d + t for t in retrieval.data.corpus])),
               dataclasses.replace(sts_ev, data=dataclasses.replace(
                   sts_ev.data, sentences1=[q + t for t in sts_ev.data.sentences1],
                   sentences2=[q + t for t in sts_ev.data.sentences2]))]
    expected = [ev.by_dim(backbone)[None] for ev in by_hand]
    backbone.choose("", *PROMPTS)
    assert [ev.by_dim(backbone)[None] for ev in (retrieval, sts_ev)] == expected


def test_evaluate_cli_defaults_to_the_saved_prompts_and_flags_override(tiny_model, tmp_path, capsys):
    from mnr.evaluate import main

    encoder, tok = load_encoder(str(tiny_model))
    choose_pipeline(encoder, "cls", *PROMPTS)
    save_model(encoder, tok, tmp_path / "out", 32)
    sts = write_tsv(tmp_path / "sts.tsv", ["sentence1", "sentence2", "score"],
                    [["a man is playing", "a man plays", "5"], ["a dog runs", "the red car", "0"],
                     ["two children", "a boy and a girl", "3"]])
    results = []
    for extra in ([], ["--query-prompt", "", "--pooling", "mean"]):
        assert main([str(tmp_path / "out"), "--data", str(sts), "--json", *extra]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert (results[0]["pooling"], results[0]["query_prompt"], results[0]["document_prompt"]) == ("cls", *PROMPTS)
    assert (results[1]["pooling"], results[1]["query_prompt"]) == ("mean", "")


def test_a_run_trains_with_prompts_and_pooling_and_records_them(tmp_path, tiny_model, nli_file):
    from sentence_transformers import SentenceTransformer

    from mnr.evaluate import encode
    from mnr.train import main

    out = tmp_path / "out"
    assert main(train_args(tiny_model, nli_file, out, "--max-steps", "2", "--eval-data", "none", "--pooling",
                           "lasttoken", "--query-prompt", "query: ", "--document-prompt", "passage: ",
                           "--cache-dir", str(tmp_path / "cache"))) == 0
    identity = json.loads((out / "mnr_run.json").read_text())["run_identity"]
    assert (identity["pooling"], identity["query_prompt"], identity["document_prompt"]) == ("lasttoken", *PROMPTS)
    assert json.loads((out / "1_Pooling" / "config.json").read_text())["pooling_mode_lasttoken"] is True
    backbone = Backbone.load(str(out))  # the export's pipeline: lasttoken and the prompts
    encoder = backbone.encoder
    assert (encoder.pipeline.pooling, encoder.pipeline.query_prompt) == ("lasttoken", "query: ")
    st = SentenceTransformer(str(out), device="cpu")
    ours = encode(backbone, ["query: " + t for t in TEXTS], max_seq_length=32)
    assert (torch.from_numpy(st.encode(TEXTS, prompt_name="query")) - ours).abs().max() < 1e-5
    # the defaults are recorded as the run uses them: the base model's pooling and prompts
    from mnr.checkpoint import run_identity
    from mnr.config import parse_config

    identity = run_identity(parse_config([]), 1, str(st_base(tiny_model, tmp_path / "base")), str(nli_file), "none")
    assert (identity["pooling"], identity["query_prompt"], identity["document_prompt"]) == ("cls", "query: ", "")


def test_each_source_takes_its_own_prompts(tmp_path, tiny_model):
    """--source-prompts: each source's texts with its own prompts (a key left out takes the global prompt);
    the bare-text rule still joins one text across sources; bad entries name the value."""
    from transformers import AutoTokenizer

    from mnr.config import ConfigError, TrainConfig, parse_config

    tok = AutoTokenizer.from_pretrained(tiny_model)
    a = write_tsv(tmp_path / "a.tsv", ["anchor", "positive"], [["a man is playing", "a dog is running outside"],
                                                               ["two children sitting", "the red car"]])
    b = write_tsv(tmp_path / "b.tsv", ["anchor", "positive"], [["what is a dog", "a man is playing"],
                                                               ["where is the car", "a blue house near the tree"]])
    cfg = parse_config(["--train-data", f"{a},{b}", "--source-prompts", '[{}, {"query": "q: "}]'])
    prompts = cfg.prompts_per_source("query: ", "passage: ")
    assert prompts == [("query: ", "passage: "), ("q: ", "passage: ")]
    store = prepare_train_store([str(a), str(b)], tok, 32, None, str(tmp_path / "cache"), prompts)
    one = prepare_train_store([str(a), str(b)], tok, 32, None, str(tmp_path / "cache"), ("query: ", "passage: "))
    assert store.path != one.path  # the per-source prompts are in the fingerprint

    def text(t):
        return tok.decode(store.token_ids[t], skip_special_tokens=True)

    rows = store.text_ids.tolist()
    assert [text(t) for t in rows[0]] == ["query : a man is playing", "passage : a dog is running outside"]
    assert [text(t) for t in rows[2]] == ["q : what is a dog", "passage : a man is playing"]
    assert store.same_text_ids()[2][1] == store.same_text_ids()[0][0]  # one bare text, across sources
    assert TrainConfig().prompts_per_source("x", "y") is None
    for bad in ['[{"query": "q: "}]', '[{}, {"title": "t"}]', "not json", '[{}, {"query": 3}]']:
        with pytest.raises(ConfigError, match="source_prompts=.* is invalid"):
            parse_config(["--train-data", f"{a},{b}", "--source-prompts", bad])
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(f"train_data: [{a}, {b}]\nsource_prompts:\n  - {{}}\n  - {{query: 'q: '}}\n")
    assert parse_config(["--config", str(yaml_file)]).prompts_per_source("", "") == [("", ""), ("q: ", "")]
