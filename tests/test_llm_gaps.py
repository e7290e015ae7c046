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


