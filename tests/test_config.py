"""Config: defaults, YAML + flags (flags win), validation errors that name the field and value."""

import pytest

from mnr.config import FIELD_NAMES, ConfigError, TrainConfig, build_parser, parse_config


def test_defaults_are_the_tutorial_recipe():
    cfg = parse_config([])
    assert (cfg.batch_size, cfg.epochs, cfg.lr, cfg.warmup_ratio, cfg.scale, cfg.max_seq_length) == (
        32, 1, 2e-5, 0.1, 20.0, 128)
    assert cfg.hard_negatives is None and cfg.k_negatives == 1  # auto: hard negatives where the data has them


def test_yaml_then_flags_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("batch-size: 64\nlr: 1.0e-4\nhard_negatives: false\nscale: 30\nweight_decay: 1e-3\n")
    cfg = parse_config(["--config", str(path), "--lr", "3e-5"])
    assert cfg.batch_size == 64 and cfg.lr == 3e-5 and cfg.hard_negatives is False and cfg.scale == 30.0
    assert cfg.weight_decay == 1e-3  # YAML 1.1 reads `1e-3` as a string; numbers still work


@pytest.mark.parametrize("argv, field, value", [
    (["--batch-size", "1"], "batch_size", "1"),
    (["--lr", "0"], "lr", "0.0"),
    (["--warmup-ratio", "1.5"], "warmup_ratio", "1.5"),
    (["--scale", "-1"], "scale", "-1.0"),
    (["--epochs", "0"], "epochs", "0"),
    (["--max-steps", "0"], "max_steps", "0"),
    (["--mini-batch-size", "-2"], "mini_batch_size", "-2"),
    (["--report-to", "mlflowx"], "report_to", "'mlflowx'"),
    (["--resume", "/no/such/dir"], "resume", "'/no/such/dir'"),
    (["--max-seq-length", "2"], "max_seq_length", "2"),
    (["--mini-batch-size", "64"], "mini_batch_size", "64"),
    (["--pooling", "max"], "pooling", "'max'"),
    (["--lora-r", "-1"], "lora_r", "-1"),
    (["--lora-alpha", "0"], "lora_alpha", "0.0"),
    (["--lora-dropout", "1"], "lora_dropout", "1.0"),
    (["--lora-target-modules", " , "], "lora_target_modules", "' , '"),
    (["--lora-adapter", "/no/such/adapter"], "lora_adapter", "'/no/such/adapter'"),
    (["--save-adapter"], "save_adapter", "True"),  # no adapter to save
    (["--save-dtype", "float16"], "save_dtype", "'float16'"),
])
def test_bad_values_name_field_and_value(argv, field, value):
    with pytest.raises(ConfigError) as err:
        parse_config(argv)
    assert f"{field}={value}" in str(err.value)


def test_yaml_errors(tmp_path):
    unknown = tmp_path / "u.yaml"
    unknown.write_text("batch_sise: 4\n")
    with pytest.raises(ConfigError, match="unknown key 'batch_sise'"):
        parse_config(["--config", str(unknown)])
    wrong_type = tmp_path / "t.yaml"
    wrong_type.write_text("batch_size: many\n")
    with pytest.raises(ConfigError, match="batch_size='many'"):
        parse_config(["--config", str(wrong_type)])
    with pytest.raises(ConfigError, match="no such file"):
        parse_config(["--config", str(tmp_path / "missing.yaml")])


def test_every_field_has_a_documented_flag():
    help_text = build_parser().format_help()
    for name in FIELD_NAMES:
        assert "--" + name.replace("_", "-") in help_text
    for flag in ["--model", "--train-data", "--eval-data", "--output-dir", "--batch-size", "--epochs", "--max-steps",
                 "--lr", "--warmup-ratio", "--weight-decay", "--scale", "--max-seq-length", "--seed",
                 "--hard-negatives", "--eval-steps", "--save-steps", "--config"]:
        assert flag in help_text


def test_bad_config_stops_before_any_model_is_loaded(capsys, monkeypatch):
    import mnr.backbone

    def boom(*a, **k):
        raise AssertionError("model loaded")

    monkeypatch.setattr(mnr.backbone.Backbone, "load", boom)
    monkeypatch.setattr(mnr.backbone, "load_tokenizer", boom)
    from mnr.train import main

    assert main(["--batch-size", "1"]) == 2
    err = capsys.readouterr().err
    assert "batch_size=1" in err and "Traceback" not in err


def test_every_shipped_yaml_recipe_parses():
    from conftest import REPO

    recipes = sorted((REPO / "configs").glob("*.yaml"))
    assert len(recipes) >= 2
    for path in recipes:
        cfg = parse_config(["--config", str(path)])
        assert cfg.model and cfg.train_data, path
    large = parse_config(["--config", str(REPO / "configs" / "gradcache_8gpu.yaml")])
    assert (large.batch_size, large.mini_batch_size, large.lr) == (1024, 64, 1e-4)
    qwen = parse_config(["--config", str(REPO / "configs" / "qwen_lora.yaml")])
    assert (qwen.lora_r, qwen.lora_alpha, qwen.gradient_checkpointing, qwen.pooling) == (16, 32.0, True, "lasttoken")
    assert qwen.query_prompt == "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery: "
    assert qwen.document_prompt == "" and qwen.mini_batch_size > 0 and qwen.gather_negatives is True


def test_llm_flags_parse_and_only_the_export_ones_may_change_on_resume(tmp_path):
    from mnr.checkpoint import MAY_CHANGE_ON_RESUME

    cfg = parse_config(["--lora-r", "8", "--lora-alpha", "16", "--lora-dropout", "0.1", "--lora-target-modules",
                        "q_proj, v_proj", "--save-adapter", "--gradient-checkpointing", "--bidirectional",
                        "--save-dtype", "bfloat16"])
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules) == (8, 16.0, 0.1, "q_proj, v_proj")
    assert cfg.save_adapter and cfg.gradient_checkpointing and cfg.bidirectional and cfg.save_dtype == "bfloat16"
    assert parse_config([]).lora_r == 0 and parse_config([]).lora_target_modules == "all-linear"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert parse_config(["--lora-adapter", str(adapter), "--save-adapter"]).lora_adapter == str(adapter)
    assert {"save_adapter", "save_dtype"} <= set(MAY_CHANGE_ON_RESUME)
    assert not {"lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_adapter",
                "gradient_checkpointing", "bidirectional"} & set(MAY_CHANGE_ON_RESUME)


@pytest.mark.parametrize("argv, hint", [
    (["--batch_size", "4"], "did you mean --batch-size?"),
    (["--learning-rate", "1e-4"], "did you mean --lr?"),
    (["--max-step", "3"], "did you mean --max-steps?"),  # an abbreviation is a typo, not a silent match
    (["--no-hard-neg"], "did you mean --no-hard-negatives?"),
])
def test_a_typo_gets_one_line_naming_the_flag_it_meant(argv, hint, capsys):
    with pytest.raises(SystemExit) as stop:
        parse_config(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: unknown flag") and hint in err


def test_help_groups_every_flag_and_ends_with_examples():
    from mnr.config import HELP_GROUPS

    grouped = [name for names in HELP_GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(FIELD_NAMES)  # each field in exactly one group
    text = build_parser().format_help()
    for title in ("data:", "model:", "LLM backbones and adapters:", "optimisation:", "distributed:", "evaluation:", "checkpoints:", "logging:"):
        assert "\n" + title in text
    assert text.rstrip().splitlines()[-1].strip().startswith("accelerate launch")
    assert "mnr-train" in build_parser(prog="mnr-train").format_usage()


def test_prompts_default_to_the_base_models_and_an_empty_one_means_none(tmp_path):
    cfg = parse_config([])
    assert (cfg.pooling, cfg.query_prompt, cfg.document_prompt) == ("", None, None)  # the base model's
    cfg = parse_config(["--query-prompt", "", "--document-prompt", "passage: ", "--pooling", "lasttoken"])
    assert (cfg.pooling, cfg.query_prompt, cfg.document_prompt) == ("lasttoken", "", "passage: ")
    path = tmp_path / "c.yaml"
    path.write_text('query_prompt: "query: "\ndocument-prompt: "passage: "\npooling: cls\n')
    cfg = parse_config(["--config", str(path)])
    assert (cfg.pooling, cfg.query_prompt, cfg.document_prompt) == ("cls", "query: ", "passage: ")


def test_ddp_timeout_reaches_the_process_group_set_up(monkeypatch):
    """--ddp-timeout is handed to Accelerate's process-group set-up (NCCL's own default of 600 s would end a
    run whose processes wait longer for the token store's build)."""
    from datetime import timedelta

    import accelerate

    from mnr import launch

    seen = {}

    class Captured(Exception):
        pass

    def fake_accelerator(**kwargs):
        seen.update(kwargs)
        raise Captured

    monkeypatch.setattr(accelerate, "Accelerator", fake_accelerator)
    with pytest.raises(Captured):
        launch.make_accelerator(parse_config(["--ddp-timeout", "7200", "--report-to", "none"]))
    [init] = [h for h in seen["kwargs_handlers"] if type(h).__name__ == "InitProcessGroupKwargs"]
    assert init.to_kwargs() == {"timeout": timedelta(seconds=7200)}
    with pytest.raises(ConfigError, match=r"ddp_timeout=0 is invalid: must be >= 1 second"):
        parse_config(["--ddp-timeout", "0"])
