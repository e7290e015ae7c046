"""The three command lines share one scaffolding (mnr/cli.py): one-line errors printed once, MNR_DEBUG, the
process group left however they end, one spelling of the common flags, one validation of them; and the typed
config (list options parsed once, `given` a field)."""

from __future__ import annotations

import json

import pytest

from conftest import nli_rows, train_args, write_tsv
from mnr import cli
from mnr.config import ConfigError, TrainConfig, parse_config

COMMON_FLAGS = ["--max-seq-length", "--batch-size", "--trust-remote-code", "--query-prompt", "--document-prompt",
                "--pooling"]


def _parsers():
    from mnr.config import build_parser as train_parser
    from mnr.evaluate import build_parser as evaluate_parser
    from mnr.mine import build_parser as mine_parser

    return {"train": train_parser(), "evaluate": evaluate_parser(), "mine": mine_parser()}


def test_the_three_parsers_spell_the_common_flags_alike_and_suggest_on_a_typo(capsys):
    for name, parser in _parsers().items():
        flags = {s for a in parser._actions for s in a.option_strings}
        assert set(COMMON_FLAGS) <= flags, name
        assert isinstance(parser, cli.Parser) and not parser.allow_abbrev
        with pytest.raises(SystemExit) as stop:
            parser.parse_args(["x", "--output", "o.tsv", "--max-seq-lenght", "8"])
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "unknown flag --max-seq-lenght; did you mean --max-seq-length" in err, name


def test_run_gives_one_line_and_2_from_rank_0_only_and_always_leaves_the_process_group(monkeypatch, capsys):
    left = []
    monkeypatch.setattr(cli.distributed, "shutdown", lambda: left.append(1))

    def bad() -> int:
        raise ConfigError("batch_size=1 is invalid: no")

    assert cli.run(lambda: 0) == 0 and cli.run(bad) == 2
    assert capsys.readouterr().err == "error: batch_size=1 is invalid: no\n"
    monkeypatch.setenv("RANK", "1")
    assert cli.run(bad) == 2 and capsys.readouterr().err == ""
    monkeypatch.setenv("MNR_DEBUG", "1")
    with pytest.raises(ConfigError):
        cli.run(bad)
    monkeypatch.setenv("MNR_DEBUG", "0")
    assert cli.run(bad) == 2
    assert cli.run(lambda: 130, errors=(RuntimeError,)) == 130
    assert len(left) == 6  # success, errors and the debug raise alike


@pytest.fixture
def pairs(tmp_path):
    return write_tsv(tmp_path / "nli.tsv", ["premise", "hypothesis", "label"], nli_rows(12))


@pytest.mark.parametrize("flags, message", [
    (["--max-seq-length", "0"], "--max-seq-length 0: must be >= 4 tokens"),
    (["--max-seq-length", "1"], "--max-seq-length 1: must be >= 4 tokens"),
    (["--max-seq-length", "65"], "--max-seq-length 65 exceeds the model's position limit (64 tokens)"),
    (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["--batch-size", "-3"], "--batch-size -3: must be >= 1"),
])
def test_evaluate_and_mine_refuse_bad_common_flags_in_one_line(tmp_path, tiny_model, sts_file, pairs, capsys,
                                                               flags, message):
    from mnr.evaluate import main as evaluate
    from mnr.mine import main as mine

    assert evaluate([str(tiny_model), "--data", str(sts_file), *flags]) == 2
    assert mine([str(pairs), "--model", str(tiny_model), "--output", str(tmp_path / "m.tsv"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {message}"] * 2
    assert not (tmp_path / "m.tsv").exists()


def test_training_refuses_a_length_beyond_the_positions_with_the_same_rule(tmp_path, tiny_model, nli_file, capsys):
    from mnr.train import main

    assert main(train_args(tiny_model, nli_file, tmp_path / "out", "--max-seq-length", "65")) == 2
    assert capsys.readouterr().err.strip() == "error: max_seq_length=65 exceeds the model's position limit (64 tokens)"


@pytest.mark.parametrize("flags, message", [
    (["--seed", "-1"], "--seed -1: must be in [0, 4294967295]"),
    (["--num-negatives", "-2"], "--num-negatives -2: must be >= 1"),
    (["--range-min", "-1"], "--range-min -1: must be >= 0"),
    (["--relative-margin", "nan"], "--relative-margin nan: must be in [0, 1)"),
    (["--margin", "inf"], "--margin inf: must be a finite number >= 0"),
])
def test_mine_refuses_its_other_bad_flags_before_loading_the_model(tmp_path, pairs, capsys, monkeypatch, flags,
                                                                   message):
    import mnr.model
    from mnr.mine import main

    monkeypatch.setattr(mnr.model, "load_encoder", lambda *a, **k: pytest.fail("model loaded"))
    assert main([str(pairs), "--output", str(tmp_path / "m.tsv"), *flags]) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"


def test_evaluate_refuses_bad_eval_dims_and_a_bad_seed_is_refused_in_training(tiny_model, sts_file, capsys):
    from mnr.evaluate import main

    assert main([str(tiny_model), "--data", str(sts_file), "--eval-dims", "8,x"]) == 2
    assert "--eval-dims '8,x': comma-separated positive whole numbers" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"seed=-1 is invalid"):
        parse_config(["--seed", "-1"])


def _saved_with_prompts(tiny_model, path):
    from mnr.model import choose_pipeline, load_encoder, save_model

    encoder, tok = load_encoder(str(tiny_model))
    choose_pipeline(encoder, "cls", "query: ", "passage: ")
    save_model(encoder, tok, path, 32)
    return path


def test_mine_defaults_to_the_models_saved_prompts_and_pooling_and_prompt_is_a_deprecated_alias(
        tmp_path, tiny_model, pairs, monkeypatch, capsys):
    import mnr.evaluate
    import mnr.model
    from mnr.mine import main

    model = _saved_with_prompts(tiny_model, tmp_path / "model")
    seen, poolings = [], []
    real = mnr.evaluate.encode_sharded

    def spy(backbone, texts, *args):
        seen.extend(backbone.policy.texts(texts, args[-1]))  # what is tokenised: the role's prompt + text
        poolings.append(backbone.pipeline.pooling)
        return real(backbone, texts, *args)

    monkeypatch.setattr(mnr.evaluate, "encode_sharded", spy)
    common = [str(pairs), "--model", str(model), "--output", str(tmp_path / "m.tsv"), "--num-negatives", "1"]
    assert main(common) == 0
    assert seen and all(t.startswith(("query: ", "passage: ")) for t in seen) and set(poolings) == {"cls"}
    queries = {t for t in seen if t.startswith("query: ")}
    assert queries and all(t.startswith("passage: ") for t in set(seen) - queries)
    capsys.readouterr()
    seen.clear()
    poolings.clear()
    assert main([*common, "--prompt", "q: ", "--document-prompt", "", "--pooling", "mean"]) == 0
    assert "warning: --prompt is deprecated; use --query-prompt" in capsys.readouterr().err
    assert {t for t in seen if t.startswith("q: ")} and not any(t.startswith("passage: ") for t in seen)
    assert set(poolings) == {"mean"}


def test_list_options_are_parsed_once_into_typed_values_and_stay_options_in_to_dict():
    cfg = TrainConfig(train_data="a.tsv*3, snli", matryoshka_dims="32, 16", matryoshka_weights="1,0.5",
                      eval_dims="8", negatives_per_query="2")
    assert (cfg.sources, cfg.weights, cfg.dims, cfg.dim_weights, cfg.evaluation_dims, cfg.k_negatives) == (
        ("a.tsv", "snli"), [3.0, 1.0], (32, 16), (1.0, 0.5), (8,), 2)
    assert TrainConfig(source_weights="2,1", train_data="a,b").weights == [2.0, 1.0]
    assert TrainConfig(matryoshka_dims="32,16").evaluation_dims == (32, 16)
    options = cfg.to_dict()
    assert options["matryoshka_dims"] == "32, 16" and options["train_data"] == "a.tsv*3, snli"
    assert not {"given", "sources", "weights", "dims", "dim_weights", "evaluation_dims", "k_negatives"} & set(options)
    json.dumps(options)


def test_given_is_a_field_a_config_built_in_code_sets_like_flags_do():
    assert TrainConfig(max_seq_length=64, seed=1).given == {"max_seq_length", "seed"}
    assert TrainConfig().given == frozenset()
    assert parse_config(["--max-seq-length", "128"]).given == {"max_seq_length"}  # typed, even at the default
    assert TrainConfig(given=frozenset({"lr"})).given == {"lr"}


def test_an_export_keeps_the_length_a_config_built_in_code_gives(tmp_path, tiny_model, nli_file):
    from mnr.train import run

    cfg = parse_config(train_args(tiny_model, nli_file, tmp_path / "out", "--max-steps", "1", "--eval-data", "none",
                                  "--cache-dir", str(tmp_path / "cache")))
    options = {k: v for k, v in cfg.to_dict().items() if k != "config"}
    run(TrainConfig(**{**options, "max_seq_length": 24}))
    saved = json.loads((tmp_path / "out" / "sentence_bert_config.json").read_text())
    assert saved["max_seq_length"] == 24
