"""Bad input found past the red-team list: each a one-line error, never a traceback."""

import errno

import pytest

from mnr import cli, distributed
from mnr.config import ConfigError, load_yaml


@pytest.mark.parametrize("content, message", [
    (b"batch_size: [1,\n", r"not valid YAML at line \d+, column \d+"),
    (b"\xff\xfe\x00b\x00a", "not a YAML text file"),
])
def test_a_config_that_is_not_yaml_is_one_line_naming_the_file(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as info:
        load_yaml(str(path))
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_a_directory_given_as_config_is_named_a_directory(tmp_path):
    with pytest.raises(ConfigError, match="a directory"):
        load_yaml(str(tmp_path))


def test_ctrl_c_in_a_command_is_one_line_and_exit_130(capsys, monkeypatch):
    monkeypatch.delenv("MNR_DEBUG", raising=False)

    def body():
        raise KeyboardInterrupt

    assert cli.run(body) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["interrupted (Ctrl-C): stopped, nothing written"]


def test_a_world_size_that_is_not_a_number_is_named(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "abc")
    monkeypatch.setenv("RANK", "x")
    assert cli.run(lambda: distributed.launched_world_size()) == 2
    assert capsys.readouterr().err.strip() == "error: WORLD_SIZE='abc' is not a whole number (the launcher sets it)"


def test_a_full_disk_while_logging_metrics_names_the_file(tmp_path, monkeypatch):
    from mnr.reporting import MetricsLog

    log = MetricsLog(type("Acc", (), {"trackers": []})(), tmp_path / "metrics.jsonl")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("builtins.open", full)
    with pytest.raises(OSError) as info:
        log.write({"step": 1, "loss": 0.5})
    assert str(tmp_path / "metrics.jsonl") in str(info.value) and "disk full" in str(info.value)


def test_trainer_state_is_strict_json_when_a_score_is_not_a_number():
    """A Spearman over constant scores is NaN: trainer_state.json holds null there (strict JSON readers, jq, other
    languages refuse NaN), and the state reads back."""
    import json
    import math

    from mnr.checkpoint import TrainState

    state = TrainState(best_score=math.nan, metrics_before={"sts/spearman": math.nan, "sts/pearson": 0.5},
                       run_identity={"lr": 1e-3}, scheduler={"last_epoch": 3})

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    data = json.loads(state.to_json(), parse_constant=refuse)
    assert data["best_score"] is None and data["metrics_before"] == {"sts/spearman": None, "sts/pearson": 0.5}
    assert TrainState.from_dict(data).scheduler == {"last_epoch": 3}
