"""The LLM path's promises, each end to end: the loss is float32 under bf16 autocast; the merged LoRA export loads
and embeds with no peft installed; the export gives the score training logged; an instruction prompt from YAML or
the command line; --bidirectional refused in one line; the trainable-parameter count; an adapter's content in the
run identity."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from conftest import nli_rows, train_args, write_tsv
from tiny_decoders import cached_decoder

from mnr.objectives import MNR, Rows
from mnr.train import main

PROMPT = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery: "
# the prompt as a YAML config writes it: double quotes, in which YAML reads \n as a newline
YAML_PROMPT = ('query_prompt: "Instruct: Given a web search query, retrieve relevant passages that answer the query'
               '\\nQuery: "\n')
TEXTS = ["a man is playing with a dog", "two children", "a red car is parked near the old house in the street"]


# --- the loss in float32 under an outer autocast --------------------------------------------------------------

@pytest.mark.parametrize("objective, n_roles", [(MNR(), 2), (MNR(scale=30.0, symmetric=True), 3),
                                                (MNR(dims=(32, 8), dim_weights=(1.0, 0.5)), 3)],
                         ids=["pairs", "hard negatives", "matryoshka"])
def test_the_objective_is_float32_under_bf16_autocast(objective, n_roles):
    """Under torch.autocast(bfloat16) (what an outer mixed-precision context does), the objective's similarities,
    its gathered candidates and its loss stay float32: the loss equals the float32 one and so does its gradient."""
    torch.manual_seed(0)
    batch, other = 8, torch.randn(n_roles * 8, 32)  # `other`: the rows of a second "process" (rank 0)
    gathered = []

    def gather(t):  # two processes, this one of rank 1; records the dtype of every gathered tensor
        gathered.append(t.dtype)
        theirs = other[: t.shape[0]] if t.dtype.is_floating_point else torch.ones(t.shape[0], dtype=t.dtype)
        return torch.cat([theirs.to(t.dtype), t])

    def loss_and_grad(embeddings, autocast):
        embeddings = embeddings.detach().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = objective(embeddings, Rows(n_roles), gather, rank=1)
        loss.backward()
        return loss.detach(), embeddings.grad

    embeddings = torch.randn(n_roles * batch, 32)
    reference, reference_grad = loss_and_grad(embeddings, autocast=False)
    loss, grad = loss_and_grad(embeddings, autocast=True)
    assert loss.dtype == grad.dtype == torch.float32
    assert float(loss) == pytest.approx(float(reference), abs=1e-6)
    assert float((grad - reference_grad).abs().max()) < 1e-6
    gathered.clear()
    half = embeddings.bfloat16()  # embeddings a bf16 model gives: upcast before the similarities and the gather
    loss, _ = loss_and_grad(half, autocast=True)
    assert loss.dtype == torch.float32 and set(gathered) == {torch.float32}
    assert float(loss) == pytest.approx(float(loss_and_grad(half.float(), autocast=False)[0]), abs=1e-6)


# --- one LoRA run with an instruction prompt from YAML and an STS eval set ---------------------------------------

def sts_rows(n: int = 24) -> list[list[str]]:
    from conftest import WORDS

    return [[f"a dog {WORDS[i % len(WORDS)]} {i} runs", f"a dog {WORDS[(i * 5) % len(WORDS)]} is running {i}",
             str(float(i % 6))] for i in range(n)]


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def lora_export(tmp_path_factory):
    """A tiny Qwen2 trained with LoRA (the adapter saved too), the instruction prompt given in YAML (double
    quotes: a real newline), evaluated on an STS file; the log lines of the run."""
    pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("gaps")
    train = write_tsv(root / "nli.tsv", ["premise", "hypothesis", "label"], nli_rows(12))
    sts = write_tsv(root / "sts.tsv", ["sentence1", "sentence2", "score"], sts_rows())
    config = root / "run.yaml"
    config.write_text(YAML_PROMPT, encoding="utf-8")
    out, lines = root / "out", Lines()
    logging.getLogger("mnr").addHandler(lines)
    try:
        rc = main(train_args(cached_decoder("qwen2"), train, out, "--config", str(config), "--max-steps", "3",
                             "--lr", "1e-2", "--eval-data", str(sts), "--max-seq-length", "96", "--lora-r", "4",
                             "--lora-alpha", "8", "--save-adapter", "--cache-dir", str(root / "cache")))
    finally:
        logging.getLogger("mnr").removeHandler(lines)
    assert rc == 0
    return out, sts, lines.lines


def test_a_yaml_instruction_prompt_keeps_its_newline_into_the_export_and_the_card(lora_export, tmp_path):
    from mnr.config import parse_config

    out, _, _ = lora_export
    config = tmp_path / "c.yaml"
    config.write_text(YAML_PROMPT, encoding="utf-8")
    assert parse_config(["--config", str(config)]).query_prompt == PROMPT
    assert json.loads((out / "config_sentence_transformers.json").read_text())["prompts"]["query"] == PROMPT
    assert repr(PROMPT) in (out / "README.md").read_text()  # the card's snippets spell it as Python


def test_a_typed_backslash_n_in_a_prompt_flag_is_a_newline_in_every_command():
    from mnr.config import parse_config
    from mnr.evaluate import build_parser as evaluate_parser
    from mnr.mine import build_parser as mine_parser

    typed = r"Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery: "
    assert "\\" in typed and "\n" not in typed  # what bash's single quotes pass: a backslash and an n
    cfg = parse_config(["--query-prompt", typed, "--document-prompt", r"passage\n"])
    assert (cfg.query_prompt, cfg.document_prompt) == (PROMPT, "passage\n")
    assert evaluate_parser().parse_args(["m", "--query-prompt", typed]).query_prompt == PROMPT
    assert mine_parser().parse_args(["d", "--output", "o.tsv", "--prompt", typed]).query_prompt == PROMPT
    assert "a \\n typed in the flag is a newline" in " ".join(evaluate_parser().format_help().split())


# --- the merged export without peft -----------------------------------------------------------------------------

NO_PEFT = r"""
import json, sys
sys.modules["peft"] = None  # `import peft` fails, and transformers' is_peft_available() says False
try:
    import peft  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("peft is importable")
import torch
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoTokenizer
from transformers.utils import is_peft_available

assert not is_peft_available()
path, texts = sys.argv[1], json.loads(sys.argv[2])
model, tokenizer = AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
with torch.no_grad():  # one text at a time: no padding; the last token is the EOS the tokenizer appends
    hf = [model(**tokenizer(t, return_tensors="pt")).last_hidden_state[0, -1].tolist() for t in texts]
st = SentenceTransformer(path, device="cpu").encode(texts).tolist()
print(json.dumps({"hf": hf, "st": st, "peft": sys.modules.get("peft") is not None}))
"""


def test_the_merged_export_loads_and_embeds_as_training_with_no_peft_installed(lora_export):
    from mnr.backbone import Backbone
    from mnr.evaluate import encode

    out, _, _ = lora_export
    ours = encode(Backbone.load(str(out)), TEXTS, max_seq_length=96)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}  # not even mnr on the path
    done = subprocess.run([sys.executable, "-c", NO_PEFT, str(out), json.dumps(TEXTS)], capture_output=True,
                          text=True, env=env, cwd=out.parent, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["peft"] is False
    for name in ("hf", "st"):
        assert float((torch.tensor(got[name]) - ours).abs().max()) < 1e-5, name


def test_lora_without_peft_is_one_line_naming_the_install(tmp_path, monkeypatch, capsys):
    from mnr.lora import INSTALL

    monkeypatch.setitem(sys.modules, "peft", None)
    train = write_tsv(tmp_path / "nli.tsv", ["premise", "hypothesis", "label"], nli_rows(8))
    rc = main(train_args(cached_decoder("qwen2"), train, tmp_path / "out", "--max-steps", "1", "--eval-data",
                         "none", "--lora-r", "4", "--cache-dir", str(tmp_path / "cache")))
    err = capsys.readouterr().err
    assert rc == 2 and f"error: {INSTALL}" in err.splitlines() and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()  # refused before anything is made
    from mnr.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match="LoRA needs peft"):  # by the config's validation, before any launch
        parse_config(["--lora-r", "4"])


# --- the export gives the score training logged -------------------------------------------------------------

def test_the_export_in_sentence_transformers_scores_what_training_logged(lora_export):
    import numpy as np
    from scipy.stats import spearmanr
    from sentence_transformers import SentenceTransformer

    out, sts, _ = lora_export
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if "sts/spearman" in r][-1]
    assert final["step"] == 3
    rows = sts_rows()
    model = SentenceTransformer(str(out), device="cpu")
    assert model.prompts["query"] == PROMPT
    a, b = (model.encode([r[i] for r in rows], prompt_name="query", normalize_embeddings=True) for i in (0, 1))
    score = 100 * spearmanr((a * b).sum(axis=1), np.array([float(r[2]) for r in rows])).statistic
    assert score == pytest.approx(final["sts/spearman"], abs=1e-4)
    bare = model.encode([r[0] for r in rows], normalize_embeddings=True)
    assert float(np.abs(bare - a).max()) > 1e-3  # the prompt is part of what was measured


# --- the log's count of trainable parameters ---------------------------------------------------------------

def test_the_log_counts_the_adapters_parameters_as_trainable(lora_export):
    import re

    from safetensors.torch import load_file

    out, _, lines = lora_export
    found = [m for line in lines if (m := re.search(r"trainable parameters: ([\d,]+) of ([\d,]+) \((\d+\.\d\d)%\)",
                                                      line))]
    assert len(found) == 1
    trainable, total = (int(found[0].group(i).replace(",", "")) for i in (1, 2))
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    base = load_file(str(cached_decoder("qwen2") / "model.safetensors"))
    assert trainable == sum(t.numel() for t in adapter.values()) > 0
    assert total == trainable + sum(t.numel() for t in base.values())
    assert found[0].group(3) == f"{100 * trainable / total:.2f}"


# --- --bidirectional refused through the command line ------------------------------------------------------

def test_bidirectional_is_refused_in_one_line_naming_the_model_type(tiny_model, tmp_path, capsys):
    train = write_tsv(tmp_path / "nli.tsv", ["premise", "hypothesis", "label"], nli_rows(8))
    rc = main(train_args(tiny_model, train, tmp_path / "out", "--max-steps", "1", "--eval-data", "none",
                         "--bidirectional", "--cache-dir", str(tmp_path / "cache")))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: --bidirectional is for decoders; model type 'bert' already attends both ways"]


# --- an adapter to start from enters the run identity by its content ----------------------------------------

def test_a_resume_after_the_start_adapter_changed_is_refused_naming_it(lora_export, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    out, _, _ = lora_export
    adapter = shutil.copytree(out / "adapter", tmp_path / "adapter")
    train = write_tsv(tmp_path / "nli.tsv", ["premise", "hypothesis", "label"], nli_rows(8))
    args = train_args(cached_decoder("qwen2"), train, tmp_path / "run", "--max-steps", "2", "--save-steps", "1",
                      "--eval-data", "none", "--lora-adapter", str(adapter), "--cache-dir", str(tmp_path / "cache"))
    assert main(args) == 0
    assert main(args + ["--resume", "auto"]) == 0  # the same adapter: the same run
    weights = adapter / "adapter_model.safetensors"
    save_file({k: v * 2 for k, v in load_file(str(weights)).items()}, str(weights))  # retrained in place
    capsys.readouterr()
    assert main(args + ["--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert "lora_adapter_files" in err and "another run" in err and "Traceback" not in err
