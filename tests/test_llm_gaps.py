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

