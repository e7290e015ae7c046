"""FSDP2 (mnr.sharding): the sharding plan equals Accelerate's, and on 2 gloo CPU processes a sharded model trains,
exports and resumes like one unsharded process over the whole global batch.

Launches (slow): tests/fsdp_worker.py `train` (every case: llama/BERT x plain, GradCache with and without
no_sync, LoRA, Matryoshka) and `resume` (new processes from the sharded checkpoint), both on 2 processes;
`reshard` on 1 process; tests/fsdp_launch_probe.py under `accelerate launch --config_file
accelerate_configs/fsdp.yaml`. The rest runs in this process without a process group.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from conftest import REPO, free_port

sys.path.insert(0, str(REPO / "tests"))
import fsdp_worker  # noqa: E402

from mnr import sharding  # noqa: E402

WEIGHT_TOL = 1e-4  # float32, 3 AdamW steps at lr 1e-2: every weight moves ~3e-2; orders of summation differ


def _env(tmp: Path) -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


def _run(cmd: list[str], tmp: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=_env(tmp), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\nexit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def torchrun(tmp: Path, mode: str, processes: int = 2) -> list[dict]:
    _run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(processes),
          "--master_port", str(free_port()), "tests/fsdp_worker.py", str(tmp), mode], tmp)
    return json.loads((tmp / f"{mode}.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, list[dict]]:
    tmp = tmp_path_factory.mktemp("fsdp")
    return tmp, torchrun(tmp, "train")


# ---- 2 processes (slow) ----------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in fsdp_worker.CASES if c != "resume"])
def test_fsdp_two_processes_batch_b_train_like_one_unsharded_process_batch_2b(trained, case):
    main, other = (r[case] for r in trained[1])
    assert main["units"] >= 3 and main["all_dtensor"]  # per layer, then the root; every parameter sharded
    assert main["moved"] > 100 * WEIGHT_TOL  # training changed the weights ...
    assert main["weight_diff"] < WEIGHT_TOL  # ... exactly as one process over the whole global batch did
    # the global gradient norm (clipping is active at 0.5): no stray factor, the same on both processes
    assert main["norms"] == pytest.approx(main["ref_norms"], rel=1e-4)
    assert other["norms"] == main["norms"]


@pytest.mark.slow
def test_fsdp_full_state_dict_is_whole_on_the_main_process_and_empty_elsewhere(trained):
    main, other = (r["llama_plain"] for r in trained[1])
    assert main["weight_diff"] < WEIGHT_TOL  # compared key by key with the unsharded model's state dict
    assert other["full_keys_elsewhere"] == 0


@pytest.mark.slow
def test_fsdp_nonfinite_check_agrees_on_every_process(trained):
    for case in ("llama_plain", "bert_lora"):
        main, other = (r[case] for r in trained[1])
        assert main["nonfinite_clean"] == other["nonfinite_clean"] == []
        # a NaN in the last process's shard only: both processes name that parameter, and only it
        assert main["nonfinite_injected"] == other["nonfinite_injected"] == [main["victim"]]


@pytest.mark.slow
def test_fsdp_sharded_checkpoint_resumed_in_new_processes_equals_uninterrupted(trained):
    tmp, _ = trained
    assert sharding.sharding_meta(tmp / "ckpt")["world_size"] == 2
    assert sorted(p.name for p in (tmp / "ckpt").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (tmp / "ckpt.tmp").exists()
    assert torchrun(tmp, "resume")[0]["resume"]["weight_diff"] == 0.0


@pytest.mark.slow
def test_fsdp_resume_under_another_world_size_is_refused_naming_both_counts(trained):
    with pytest.raises(sharding.ShardingError, match="saved by 2 processes and this run has 1"):
        sharding.load_sharded(torch.nn.Linear(2, 2), None, trained[0] / "ckpt")


@pytest.mark.slow
def test_fsdp_checkpoint_of_2_processes_resharded_onto_1_continues_exactly(trained):
    tmp, _ = trained
    assert torchrun(tmp, "reshard", processes=1)[0]["reshard"]["weight_diff"] < 1e-6


@pytest.mark.slow
def test_fsdp_accelerate_launch_on_cpu_is_told_clearly(tmp_path):
    _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/fsdp.yaml",
          "--num_processes", "2", "--main_process_port", str(free_port()), "tests/fsdp_launch_probe.py", str(tmp_path)],
         tmp_path)
    lines = [p.read_text() for p in sorted(tmp_path.glob("rank*.txt"))]
    assert len(lines) == 2 and all("DistributedType.NO" in line for line in lines)  # two independent runs
    assert all("no GPU" in line and "2 launched processes would train 2 separate models" in line for line in lines)


# ---- in this process -------------------------------------------------------------------------------------------


def _recorded_plan(monkeypatch, shard) -> list[tuple]:
    """The fully_shard calls `shard` makes (modules' class names, reshard_after_forward, mixed precision policy),
    none carried out."""
    import torch.distributed.fsdp as fsdp

    calls = []

    def record(module, **kwargs):
        modules = module if isinstance(module, list) else [module]
        calls.append((tuple(type(m).__name__ for m in modules), kwargs.get("reshard_after_forward", "default"),
                      repr(kwargs.get("mp_policy"))))
        return module

    monkeypatch.setattr(fsdp, "fully_shard", record)
    shard()
    return calls


def _accelerate_prepare(model, reshard_after_forward: bool, layer_classes: list[str], mixed_precision: str):
    """Accelerate's own FSDP2 preparation with the plugin a TRANSFORMER_BASED_WRAP config gives."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            reshard_after_forward=reshard_after_forward,
                                            cpu_ram_efficient_loading=False,
                                            transformer_cls_names_to_wrap=layer_classes)
    if mixed_precision != "no":
        plugin.set_mixed_precision(mixed_precision)  # as AcceleratorState does for --mixed_precision
    accelerator = types.SimpleNamespace(state=types.SimpleNamespace(fsdp_plugin=plugin), mixed_precision=mixed_precision,
                                        is_main_process=True, device=torch.device("cpu"))
    return fsdp2_prepare_model(accelerator, model)


def _bare_llama():
    return fsdp_worker.build("llama", "plain").transformer


def _bare_qwen2():
    from transformers import Qwen2Config, Qwen2Model

    return Qwen2Model(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2))


MODELS = {"llama": _bare_llama, "qwen2": _bare_qwen2, "bert": lambda: fsdp_worker.build("bert", "plain").transformer,
          "encoder_llama": lambda: fsdp_worker.build("llama", "plain"),
          "encoder_bert_lora": lambda: fsdp_worker.build("bert", "lora")}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("reshard, precision", [(True, "no"), (False, "no"), (True, "bf16")])
def test_fsdp_shard_model_makes_the_calls_accelerates_fsdp2_plugin_makes(monkeypatch, name, reshard, precision):
    classes = sharding.layer_class_names(MODELS[name]())
    policy = sharding.mixed_precision_policy(precision)
    mine = _recorded_plan(monkeypatch, lambda: sharding.shard_model(MODELS[name](), reshard, classes, policy))
    theirs = _recorded_plan(monkeypatch, lambda: _accelerate_prepare(MODELS[name](), reshard, classes, precision))
    assert mine == theirs
    layers = [c for c in mine if c[0][0].endswith(("DecoderLayer", "BertLayer"))]
    assert len(layers) == 2 and all(r == reshard for _, r, _ in layers)  # one unit per layer, then the root last
    assert mine[-1][1] == "default"


def test_fsdp_accelerate_shards_a_wrapper_per_layer_only_when_it_names_its_layer_classes(monkeypatch):
    """Accelerate reads `_no_split_modules` of the module it prepares: an embedder around the transformer must
    expose the transformer's (or the config name them), else the whole model is one unit."""
    monkeypatch.delenv("FSDP_TRANSFORMER_CLS_TO_WRAP", raising=False)
    bare = _recorded_plan(monkeypatch, lambda: _accelerate_prepare(MODELS["encoder_llama"](), True, None, "no"))
    assert [c[0] for c in bare] == [("Encoder",)]

    def exposed():
        encoder = MODELS["encoder_llama"]()
        encoder._no_split_modules = encoder.transformer._no_split_modules
        return encoder

    theirs = _recorded_plan(monkeypatch, lambda: _accelerate_prepare(exposed(), True, None, "no"))
    assert theirs == _recorded_plan(monkeypatch, lambda: sharding.shard_model(MODELS["encoder_llama"]()))


def test_fsdp_shard_model_names_a_layer_class_the_model_lacks():
    with pytest.raises(sharding.ShardingError, match="'GPT2Block' is not in the model"):
        sharding.shard_model(_bare_llama(), layer_classes=["GPT2Block"])


def test_fsdp_plan_follows_the_accelerate_launch_environment():
    assert sharding.plan_from_env({}) == {"reshard_after_forward": True, "layer_classes": None}
    env = {"FSDP_RESHARD_AFTER_FORWARD": "false", "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer, BertLayer"}
    assert sharding.plan_from_env(env) == {"reshard_after_forward": False,
                                           "layer_classes": ["LlamaDecoderLayer", "BertLayer"]}
    assert sharding.cpu_sharding_requested({"MNR_FSDP_CPU": "1"}) and not sharding.cpu_sharding_requested({})


@pytest.mark.parametrize("env, has_gpu, expected", [
    ({"ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "2"}, False, "2 launched processes would train 2 separate models"),
    ({"ACCELERATE_USE_FSDP": "true"}, False, "nothing would be sharded"),
    ({"ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "8"}, True, None),
    ({"ACCELERATE_USE_FSDP": "false", "WORLD_SIZE": "2"}, False, None),
    ({"WORLD_SIZE": "2"}, False, None),
])
def test_fsdp_launch_problem_from_the_environment(env, has_gpu, expected):
    problem = sharding.fsdp_launch_problem(env, has_gpu=has_gpu)
    assert problem is None if expected is None else (expected in problem and "\n" not in problem)


def test_fsdp_launch_problem_from_a_state_that_formed_no_group(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    state = types.SimpleNamespace(distributed_type="DistributedType.FSDP", fsdp_plugin=object(), num_processes=1)
    assert "set up 1 of the 2 launched processes" in sharding.fsdp_launch_problem(state, has_gpu=True)
    state.num_processes = 2
    assert sharding.fsdp_launch_problem(state, has_gpu=True) is None


def test_fsdp_helpers_on_an_unsharded_module_are_the_single_process_answers():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model(torch.randn(5, 4)).square().sum().backward()
    twin = [p.grad.clone() for p in model.parameters()]
    expected = torch.linalg.vector_norm(torch.stack([g.norm() for g in twin]))
    assert float(sharding.clip_grad_norm_(model.parameters(), 0.1)) == pytest.approx(float(expected))
    assert float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))) == \
        pytest.approx(0.1, rel=1e-5)
    assert sharding.full_state_dict(model).keys() == model.state_dict().keys()
    assert sharding.nonfinite_parameters(model) == []
    with torch.no_grad():
        model[1].bias[0] = float("inf")
    assert sharding.nonfinite_parameters(model) == ["1.bias"]
    with sharding.no_sync(model):
        pass


def test_fsdp_incomplete_sharded_checkpoint_is_refused(tmp_path):
    (tmp_path / "ckpt.tmp").mkdir()  # a save that died before the rename
    with pytest.raises(sharding.ShardingError, match="no complete sharded checkpoint"):
        sharding.load_sharded(torch.nn.Linear(2, 2), None, tmp_path / "ckpt.tmp")


def test_fsdp_sharded_checkpoint_round_trip_and_a_failed_save_leaves_the_previous_one(tmp_path, monkeypatch):
    """One process, no process group: the same files and rename; a save that fails midway removes its
    temporary and keeps the checkpoint that was there."""
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    sharding.save_sharded(model, optimizer, tmp_path / "ckpt")
    assert sharding.sharding_meta(tmp_path / "ckpt") == {"world_size": 1, "format": "torch.distributed.checkpoint",
                                                         "optimizer": True}

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dcp, "save", disk_full)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        sharding.save_sharded(model, optimizer, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt.tmp").exists()
    monkeypatch.undo()
    fresh = torch.nn.Linear(3, 2)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    sharding.load_sharded(fresh, fresh_optimizer, tmp_path / "ckpt")
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())
    assert fresh_optimizer.state_dict()["state"][0]["step"] == 1
