"""Cross-process negatives, proved for real: `accelerate launch` starts 2 gloo processes on this CPU.

Four launches in all (each costs seconds of start-up), shared by the tests through module fixtures:
  - tests/dist_worker.py under --multi_gpu: loss and gradient of the gather (random embeddings), and
    GradCache under DDP (tiny random BERT);
  - train_mnr.py under --multi_gpu, batch 4 per process, gathered (the default);
  - the same with --no-gather-negatives;
  - train_mnr.py under --config_file accelerate_configs/cpu_2proc.yaml with GradCache and --eval-steps;
and one in-process single-process run with batch 8 over the same examples.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, build_tiny_model, free_port, load_weights, max_abs_diff, nli_rows, write_tsv

pytestmark = pytest.mark.slow

LOCAL_BATCH = 4
TRAIN_ARGS = ["--lr", "1e-3", "--max-steps", "3", "--warmup-ratio", "0", "--weight-decay", "0",
              "--max-seq-length", "32", "--report-to", "none", "--no-progress", "--eval-data", "none",
              "--log-steps", "1"]  # max_grad_norm stays 1.0: the gradient norm is ~2-9 here, so clipping is active


def launch(launcher_args: list[str], script_and_args: list[str], tmp: Path, **extra_env: str
           ) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", MNR_CACHE=str(tmp / "token-cache"), **extra_env)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher_args, "--main_process_port",
           str(free_port()), *script_and_args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\nexit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


MULTI_GPU = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
             "--dynamo_backend", "no"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("dist-tiny") / "model", dropout=0.0)


@pytest.fixture(scope="module")
def worker(tmp_path_factory, tiny) -> list[dict]:
    tmp = tmp_path_factory.mktemp("dist-worker")
    launch(MULTI_GPU, ["tests/dist_worker.py", str(tiny), str(tmp / "out.json")], tmp)
    return json.loads((tmp / "out.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny) -> dict[str, Path]:
    """Output dirs of the same 3 steps over the same examples: 1 process x 8, and 2 processes x 4."""
    from mnr.train import main

    tmp = tmp_path_factory.mktemp("dist-runs")
    data = write_tsv(tmp / "nli.tsv", ["premise", "hypothesis", "label"], nli_rows())
    sts = write_tsv(tmp / "sts.tsv", ["sentence1", "sentence2", "score"],
                    [[f"a dog {i} runs", f"the dog {i} is running", str(float(i % 6))] for i in range(20)])
    common = ["--model", str(tiny), "--train-data", str(data), "--cache-dir", str(tmp / "token-cache"), *TRAIN_ARGS]
    out = {name: tmp / name for name in ("single", "gathered", "not_gathered", "config_gradcache")}
    assert main([*common, "--batch-size", str(2 * LOCAL_BATCH), "--output-dir", str(out["single"])]) == 0
    per_process = [*common, "--batch-size", str(LOCAL_BATCH)]
    launch(MULTI_GPU, ["train_mnr.py", *per_process, "--output-dir", str(out["gathered"])], tmp)
    launch(MULTI_GPU, ["train_mnr.py", *per_process, "--no-gather-negatives", "--output-dir",
                       str(out["not_gathered"])], tmp)
    # the CPU launch config, with GradCache (chunks of 3 rows) and evaluation every 2 steps on top
    launch(["--config_file", "accelerate_configs/cpu_2proc.yaml"],
           ["train_mnr.py", *per_process, "--mini-batch-size", "3", "--eval-steps", "2", "--eval-data", str(sts),
            "--output-dir", str(out["config_gradcache"])], tmp)
    return out


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---- proof 1: the loss and gradient of each process equal the single-process ones -------------------------


@pytest.mark.parametrize("case", ["pairs", "triplets", "symmetric", "symmetric_triplets", "k3", "k3_masked"])
def test_gathered_loss_equals_single_process_loss(worker, case):
    assert [r["world"] for r in worker] == [2, 2] and "MULTI_CPU" in worker[0]["distributed_type"]
    for r in worker:
        res = r["loss"][case]
        assert abs(res["gathered_loss"] - res["single_loss_mine"]) < 1e-6, (r["rank"], res)
    # the mean of the processes' losses is the single-process loss over the whole 2B batch
    mean = sum(r["loss"][case]["gathered_loss"] for r in worker) / len(worker)
    assert abs(mean - worker[0]["loss"][case]["single_loss_all"]) < 1e-6


@pytest.mark.parametrize("case", ["pairs", "triplets", "symmetric", "symmetric_triplets", "k3", "k3_masked"])
def test_gathered_gradient_over_n_equals_single_process_gradient(worker, case):
    """The all-gather's backward sums over processes; DDP's /N then gives the single-process gradient."""
    for r in worker:
        res = r["loss"][case]
        assert res["grad_max"] > 1e-2  # a gradient that is there, so the comparison means something
        assert res["grad_diff"] < 1e-6, (r["rank"], res)


# ---- GradCache with 2 processes --------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["triplets", "symmetric", "matryoshka", "k3"])
def test_gradcache_two_processes_matches_uncached_and_single_process(worker, case):
    from test_gradcache import tolerance  # 1e-5, growing with the gradient above 2 (Matryoshka's are larger)

    for r in worker:
        res = r["gradcache"][case]
        bound = tolerance(res["grad_max"])
        assert res["cached_loss"] == pytest.approx(res["loss"], abs=1e-6)
        assert res["cached_vs_uncached"] < bound, res
        assert res["uncached_vs_single"] < bound, res  # DDP model gradient == whole-batch single process
        assert res["cached_vs_single"] < bound, res


# ---- proofs 2 and 3: weights after 3 AdamW steps ---------------------------------------------------------


def test_two_processes_batch_b_train_like_one_process_batch_2b(runs):
    diff = max_abs_diff(load_weights(runs["gathered"]), load_weights(runs["single"]))
    print(f"max |w(2 proc x {LOCAL_BATCH}, gathered) - w(1 proc x {2 * LOCAL_BATCH})| = {diff:.3g}")
    assert diff < 5e-5


def test_without_gather_the_weights_clearly_differ(runs, tiny):
    base = load_weights(tiny)  # saved without a pooler; the export adds the one initialised at load
    moved = max_abs_diff({k: v for k, v in load_weights(runs["single"]).items() if k in base}, base)
    diff = max_abs_diff(load_weights(runs["not_gathered"]), load_weights(runs["single"]))
    print(f"max |w(no gather) - w(single)| = {diff:.3g}; training moved the weights by up to {moved:.3g}")
    assert moved > 1e-3
    assert diff > 1e-3


def test_gradcache_run_via_cpu_launch_config_trains_like_one_process(runs):
    diff = max_abs_diff(load_weights(runs["config_gradcache"]), load_weights(runs["single"]))
    print(f"max |w(cpu_2proc.yaml, GradCache M=3) - w(single)| = {diff:.3g}")
    assert diff < 5e-5
    records = metrics(runs["config_gradcache"])
    assert [r["step"] for r in records if "sts/spearman" in r] == [0, 2, 3]  # eval mid-run did not hang
    assert (runs["config_gradcache"] / "best" / "model.safetensors").is_file()


def test_logs_show_global_batch_and_shared_negatives(runs):
    """Triplets: each anchor sees the other positives and every negative of the global batch."""
    expect = {"single": (8, 2 * 8 - 1), "gathered": (8, 2 * 8 - 1), "not_gathered": (8, 2 * LOCAL_BATCH - 1),
              "config_gradcache": (8, 2 * 8 - 1)}
    for name, (global_batch, negatives) in expect.items():
        steps = [r for r in metrics(runs[name]) if "loss" in r]
        assert [r["step"] for r in steps] == [1, 2, 3], name
        assert {(r["global_batch"], r["negatives_per_anchor"]) for r in steps} == {(global_batch, negatives)}, name
    # every process wrote into one output dir without clobbering: one record per step, from rank 0
    assert json.loads((runs["gathered"] / "mnr_run.json").read_text())["world_size"] == 2


# ---- launch configs and FSDP / DeepSpeed guards (no launch) ----------------------------------------------


def test_launch_configs_parse_with_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file

    expect = {"single_gpu": ("NO", 1), "multi_gpu": ("MULTI_GPU", 8), "multi_node": ("MULTI_GPU", 16),
              "fsdp": ("FSDP", 8), "deepspeed_zero2": ("DEEPSPEED", 8), "cpu_2proc": ("MULTI_GPU", 2)}
    for name, (kind, processes) in expect.items():
        config = load_config_from_file(str(REPO / "accelerate_configs" / f"{name}.yaml"))
        assert (str(config.distributed_type).split(".")[-1], config.num_processes) == (kind, processes), name
    assert load_config_from_file(str(REPO / "accelerate_configs" / "cpu_2proc.yaml")).use_cpu
    assert load_config_from_file(str(REPO / "accelerate_configs" / "multi_node.yaml")).num_machines == 2


def _fake_accelerator(kind: str, zero_stage: int = 2, fsdp_version: int = 2, offload: bool = False,
                      checkpointing: bool = False, mixed_precision: str = "bf16"):
    from types import SimpleNamespace

    from accelerate.utils import FullyShardedDataParallelPlugin

    ds = {"zero_optimization": {"stage": zero_stage}, "train_micro_batch_size_per_gpu": "auto",
          "gradient_clipping": "auto"}
    fsdp = FullyShardedDataParallelPlugin(fsdp_version=fsdp_version, cpu_offload=offload,
                                          activation_checkpointing=checkpointing) if kind == "FSDP" else None
    return SimpleNamespace(distributed_type=f"DistributedType.{kind}", mixed_precision=mixed_precision,
                           state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=ds),
                                                 fsdp_plugin=fsdp))


@pytest.mark.parametrize("kind,zero_stage,flags,message", [
    ("FSDP1", 2, [], "fsdp_version=1 is not supported: mnr shards with FSDP2; set fsdp_version: 2"),
    ("FSDP_OFFLOAD", 2, [], "fsdp_offload_params=true is not supported"),
    ("FSDP_FP16", 2, [], "mixed_precision=fp16 is not supported under FSDP2: use bf16"),
    ("FSDP_AC", 2, [], "fsdp_activation_checkpointing=true is not read by mnr.*--gradient-checkpointing"),
    ("DEEPSPEED", 2, ["--mini-batch-size", "2"], "GradCache"),
    ("DEEPSPEED", 3, [], r"ZeRO-3 shards the parameters.*use FSDP2 \(accelerate_configs/fsdp.yaml\)"),
    ("DEEPSPEED", 2, ["--skip-nonfinite"], "skip-nonfinite"),
])
def test_fsdp_and_deepspeed_fail_clearly_where_they_would_train_wrong(kind, zero_stage, flags, message):
    from mnr.config import parse_config
    from mnr.launch import LaunchError as TrainingError, check_backend as _check_backend

    accelerator = _fake_accelerator(kind[:4] if kind.startswith("FSDP") else kind, zero_stage,
                                    fsdp_version=1 if kind == "FSDP1" else 2, offload=kind == "FSDP_OFFLOAD",
                                    checkpointing=kind == "FSDP_AC",
                                    mixed_precision="fp16" if kind == "FSDP_FP16" else "bf16")
    with pytest.raises(TrainingError, match=message):
        _check_backend(accelerator, parse_config(["--batch-size", "8", *flags]))


@pytest.mark.parametrize("flags", [[], ["--mini-batch-size", "2"], ["--skip-nonfinite"]])
def test_fsdp2_is_accepted_with_gradcache(flags):
    from mnr.config import parse_config
    from mnr.launch import check_backend

    check_backend(_fake_accelerator("FSDP"), parse_config(["--batch-size", "8", *flags]))


def test_fsdp_launch_on_a_machine_without_gpu_gets_one_clear_line_not_independent_runs(tmp_path, tiny):
    """accelerate_configs/fsdp.yaml on this CPU: Accelerate would start 2 processes of world size 1 each."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/fsdp.yaml",
           "--num_processes", "2", "--main_process_port", str(free_port()), "train_mnr.py", "--model", str(tiny),
           "--output-dir", str(tmp_path / "out"), *TRAIN_ARGS]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert "FSDP was requested" in errors[0] and "2 launched processes would train 2 separate models" in errors[0]
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_deepspeed_takes_batch_size_and_clipping_from_the_flags():
    from mnr.config import parse_config
    from mnr.launch import check_backend as _check_backend

    accelerator = _fake_accelerator("DEEPSPEED")
    _check_backend(accelerator, parse_config(["--batch-size", "8", "--max-grad-norm", "0.5"]))
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_clipping"], ds["gradient_accumulation_steps"]) == \
        (8, 0.5, 1)
    _check_backend(_fake_accelerator("MULTI_GPU"), parse_config(["--mini-batch-size", "2"]))  # DDP: all allowed


# ---- FSDP2 through train_mnr.py: the CPU proof of the production path (MNR_FSDP_CPU=1) ------------------


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory, tiny) -> dict[str, Path]:
    """1 process x 8 (unsharded), and train_mnr.py sharded over 2 gloo processes x 4 (the cpu_2proc config with
    MNR_FSDP_CPU=1): plain with checkpoints every 2 steps, GradCache (chunks of 3), a resume of the plain
    run's sharded checkpoint-2 in new processes, and Matryoshka (against 1 process x 8 with the same sizes)."""
    from mnr.train import main

    tmp = tmp_path_factory.mktemp("fsdp-runs")
    data = write_tsv(tmp / "nli.tsv", ["premise", "hypothesis", "label"], nli_rows())
    common = ["--model", str(tiny), "--train-data", str(data), "--cache-dir", str(tmp / "token-cache"), *TRAIN_ARGS]
    out = {name: tmp / name for name in ("single", "sharded", "sharded_gradcache", "sharded_resumed",
                                         "single_matryoshka", "sharded_matryoshka", "single_lora", "sharded_lora")}
    matryoshka = ["--matryoshka-dims", "32,16,8"]
    lora = ["--lora-r", "4", "--lora-alpha", "8"]
    assert main([*common, "--batch-size", str(2 * LOCAL_BATCH), "--output-dir", str(out["single"])]) == 0
    assert main([*common, *matryoshka, "--batch-size", str(2 * LOCAL_BATCH), "--output-dir",
                 str(out["single_matryoshka"])]) == 0
    assert main([*common, *lora, "--batch-size", str(2 * LOCAL_BATCH), "--output-dir", str(out["single_lora"])]) == 0
    per_process = [*common, "--batch-size", str(LOCAL_BATCH)]
    config = ["--config_file", "accelerate_configs/cpu_2proc.yaml"]
    out["log"] = launch(config, ["train_mnr.py", *per_process, "--save-steps", "2", "--output-dir",
                                 str(out["sharded"])], tmp, MNR_FSDP_CPU="1").stderr
    launch(config, ["train_mnr.py", *per_process, "--mini-batch-size", "3", "--output-dir",
                    str(out["sharded_gradcache"])], tmp, MNR_FSDP_CPU="1")
    launch(config, ["train_mnr.py", *per_process, "--resume", str(out["sharded"] / "checkpoint-2"), "--output-dir",
                    str(out["sharded_resumed"])], tmp, MNR_FSDP_CPU="1")
    launch(config, ["train_mnr.py", *per_process, *matryoshka, "--output-dir", str(out["sharded_matryoshka"])], tmp,
           MNR_FSDP_CPU="1")
    launch(config, ["train_mnr.py", *per_process, *lora, "--output-dir", str(out["sharded_lora"])], tmp,
           MNR_FSDP_CPU="1")  # the export: the gathered shards, merged
    return out


@pytest.mark.parametrize("run", ["sharded", "sharded_gradcache", "sharded_resumed", "sharded_matryoshka",
                                 "sharded_lora"])
def test_fsdp_train_mnr_two_sharded_processes_batch_b_train_like_one_process_batch_2b(fsdp_runs, run):
    assert "model sharded over 2 processes (FSDP2, one unit per " in fsdp_runs["log"] and "BertLayer" in fsdp_runs["log"]
    single = fsdp_runs[{"sharded_matryoshka": "single_matryoshka", "sharded_lora": "single_lora"}.get(run, "single")]
    diff = max_abs_diff(load_weights(fsdp_runs[run]), load_weights(single))
    print(f"max |w({run}, 2 proc x {LOCAL_BATCH}) - w(1 proc x {2 * LOCAL_BATCH})| = {diff:.3g}")
    assert diff < 5e-5


def test_fsdp_train_mnr_checkpoint_holds_each_process_shard(fsdp_runs):
    from mnr.sharding import sharding_meta

    sharded = fsdp_runs["sharded"] / "checkpoint-2" / "training_state" / "sharded"
    assert sharding_meta(sharded)["world_size"] == 2
    assert sorted(p.name for p in sharded.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    # the checkpoint's model files are whole, as the final export
    assert max_abs_diff(load_weights(fsdp_runs["sharded"] / "checkpoint-2"),
                        load_weights(fsdp_runs["single"])) > 0  # step 2, not the final weights
    assert set(load_weights(fsdp_runs["sharded"] / "checkpoint-2")) == set(load_weights(fsdp_runs["single"]))


def test_fsdp_train_mnr_export_loads_in_automodel_and_sentence_transformers(fsdp_runs):
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    path = fsdp_runs["sharded"]
    model = AutoModel.from_pretrained(path)
    reference = AutoModel.from_pretrained(fsdp_runs["single"])
    assert max(float((a - b).abs().max()) for a, b in zip(model.state_dict().values(),
                                                            reference.state_dict().values())) < 5e-5
    texts = ["a dog runs", "the cat sleeps"]
    sharded, single = (SentenceTransformer(str(p), device="cpu").encode(texts, convert_to_tensor=True)
                       for p in (path, fsdp_runs["single"]))
    assert torch.allclose(sharded, single, atol=1e-4)


# ---- two machines: accelerate_configs/multi_node.yaml, proven on this CPU ---------------------------------


@pytest.mark.parametrize("cache", ["node-local", "shared"])
def test_two_machines_one_process_each_train_like_one_process_batch_2b(runs, tiny, tmp_path, cache):
    """Two `accelerate launch` commands with the multi-node config (machine ranks 0 and 1 on 127.0.0.1), one
    CPU process each; a node-local token cache each (as on machines that share no filesystem), or one cache dir
    for both (a shared filesystem: they build one store together, each tokenising a share of the texts)."""
    data = runs["single"].parent / "nli.tsv"
    port = str(free_port())
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", MNR_TOKENISE_CHUNK="7")  # small chunks: both machines get some
    out = tmp_path / "multi_node"
    procs = []
    for machine in (0, 1):
        cmd = [sys.executable, "-m", "accelerate.commands.launch",
               "--config_file", "accelerate_configs/multi_node.yaml", "--num_processes", "2", "--machine_rank", str(machine), "--main_process_ip", "127.0.0.1",
               "--main_process_port", port, "--mixed_precision", "no", "--dynamo_backend", "no",
               "train_mnr.py", "--model", str(tiny), "--train-data", str(data),
               "--cache-dir", str(tmp_path / (f"node{machine}-cache" if cache == "node-local" else "shared-cache")),
               *TRAIN_ARGS, "--batch-size", str(LOCAL_BATCH),
               "--output-dir", str(out)]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for machine, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"machine {machine} exit {p.returncode}\n{log[-5000:]}"
    if cache == "node-local":  # one store per node, each built alone
        manifests = [next((tmp_path / f"node{m}-cache").glob("store-*/manifest.json")) for m in (0, 1)]
        assert [json.loads(m.read_text())["built_by"]["processes"] for m in manifests] == [1, 1]
    else:  # one store, both machines tokenised a share
        [manifest] = (tmp_path / "shared-cache").glob("store-*/manifest.json")
        built = json.loads(manifest.read_text())["built_by"]
        assert built["processes"] == 2 and min(built["texts"]) > 0, built
        assert "the tokenising split over 2 processes" in logs[0]
    assert "2 processes x 4" in logs[0]
    diff = max_abs_diff(load_weights(out), load_weights(runs["single"]))
    print(f"max |w(2 machines x 1 proc x {LOCAL_BATCH}) - w(1 proc x {2 * LOCAL_BATCH})| = {diff:.3g}")
    assert diff < 5e-5


@pytest.mark.slow
def test_fsdp_train_mnr_a_sharded_decoder_trains_like_one_process(tmp_path):
    """A tiny Qwen2 (last-token pooling, EOS appended, one FSDP2 unit per decoder layer) through train_mnr.py
    sharded over 2 gloo processes x 4 ends at the weights of 1 process x 8, and its export loads."""
    from transformers import AutoModel

    from mnr.train import main
    from tiny_decoders import build_tiny_decoder

    model = build_tiny_decoder(tmp_path / "qwen2", "qwen2")
    data = write_tsv(tmp_path / "nli.tsv", ["premise", "hypothesis", "label"], nli_rows())
    common = ["--model", str(model), "--train-data", str(data), "--cache-dir", str(tmp_path / "token-cache"),
              *TRAIN_ARGS]
    assert main([*common, "--batch-size", str(2 * LOCAL_BATCH), "--output-dir", str(tmp_path / "single")]) == 0
    log = launch(["--config_file", "accelerate_configs/cpu_2proc.yaml"],
                 ["train_mnr.py", *common, "--batch-size", str(LOCAL_BATCH), "--output-dir", str(tmp_path / "sharded")],
                 tmp_path, MNR_FSDP_CPU="1").stderr
    assert "model sharded over 2 processes (FSDP2, one unit per " in log and "Qwen2DecoderLayer" in log
    diff = max_abs_diff(load_weights(tmp_path / "sharded"), load_weights(tmp_path / "single"))
    print(f"max |w(qwen2, 2 proc x {LOCAL_BATCH}) - w(1 proc x {2 * LOCAL_BATCH})| = {diff:.3g}")
    assert diff < 5e-5
    AutoModel.from_pretrained(tmp_path / "sharded")


@pytest.mark.slow
def test_fsdp_train_mnr_uneven_negatives_under_gradcache_keep_the_processes_in_step(tmp_path, tiny):
    """Examples with fewer than k negatives leave their empty slots out of the forward, so the processes of a
    launch would embed different numbers of rows, and under GradCache run different numbers of chunks: sharded
    parameters (one all-gather per unit per forward) would then fall out of step.  Sharded, every slot is
    embedded: 2 sharded processes x 4 end at the weights of 1 process x 8."""
    from test_sources import _k_all_args, _uneven_negatives

    from mnr.train import main

    args = _k_all_args(tiny, _uneven_negatives(tmp_path), tmp_path / "token-cache")
    assert main([*args, "--batch-size", str(2 * LOCAL_BATCH), "--output-dir", str(tmp_path / "single")]) == 0
    launch(["--config_file", "accelerate_configs/cpu_2proc.yaml"],
           ["train_mnr.py", *args, "--batch-size", str(LOCAL_BATCH), "--mini-batch-size", "3", "--output-dir",
            str(tmp_path / "sharded")], tmp_path, MNR_FSDP_CPU="1")
    diff = max_abs_diff(load_weights(tmp_path / "sharded"), load_weights(tmp_path / "single"))
    print(f"max |w(uneven negatives, 2 sharded proc x {LOCAL_BATCH}) - w(1 proc x {2 * LOCAL_BATCH})| = {diff:.3g}")
    assert diff < 5e-5
