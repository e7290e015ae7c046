"""The objective: chosen by the config, the loss of one step's embeddings, and how the card and the run identity
name it."""

import json

import pytest
import torch

from mnr.checkpoint import MAY_CHANGE_ON_RESUME, run_identity
from mnr.config import parse_config
from mnr.loss import mnr_loss
from mnr.objectives import MNR, Rows, objective_from_config


def test_the_config_chooses_mnr_with_its_scale_symmetry_and_matryoshka_sizes():
    objective = objective_from_config(parse_config(["--scale", "30", "--symmetric", "--matryoshka-dims", "8,4",
                                                    "--matryoshka-weights", "1,0.5"]))
    assert (objective.scale, objective.symmetric, objective.dims, objective.dim_weights) == (30.0, True, (8, 4),
                                                                                              (1.0, 0.5))


def test_the_objective_is_the_mnr_loss_of_the_rows_roles():
    torch.manual_seed(0)
    a, p, n1, n2 = torch.randn(4, 4, 8).unbind(0)
    objective = MNR(scale=10.0, symmetric=True, dims=(8, 4), dim_weights=(1.0, 0.5))
    got = objective(torch.cat([a, p, n1, n2]), Rows(4))
    assert float(got) == float(mnr_loss(a, p, [n1, n2], scale=10.0, symmetric=True, dims=(8, 4),
                                        dim_weights=(1.0, 0.5)))


def test_empty_negative_slots_take_their_positives_row_and_are_masked():
    torch.manual_seed(1)
    a, p, n = torch.randn(3, 2, 8).unbind(0)
    # rows embedded: anchors, positives, the first example's negative; the second's slot is empty
    embedded = torch.cat([a, p, n[:1]])
    rows = Rows(3, row_index=torch.tensor([0, 1, 2, 3, 4, 3]), negative_mask=torch.tensor([[True], [False]]))
    expected = mnr_loss(a, p, [torch.stack([n[0], p[1]])], negative_mask=rows.negative_mask)
    assert float(MNR()(embedded, rows)) == float(expected)


def test_rows_of_a_batch_read_its_index_and_mask():
    batch = {"row_index": torch.tensor([0, 1, 1]), "negative_mask": None}
    rows = Rows.of_batch(batch, 3)
    assert rows.n_roles == 3 and rows.row_index.tolist() == [0, 1, 1] and rows.negative_mask is None


def test_the_card_rows_name_the_loss_its_scale_and_matryoshka_sizes():
    described = objective_from_config(parse_config(["--symmetric", "--matryoshka-dims", "8, 4"])).describe()
    assert described == {"loss": "MultipleNegativesRankingLoss (symmetric)", "scale": 20.0,
                         "Matryoshka dims (weights)": "8, 4 (1.0, 1.0)"}
    assert MNR().describe() == {"loss": "MultipleNegativesRankingLoss", "scale": 20.0}


@pytest.mark.parametrize("flags", [[], ["--symmetric", "--scale", "7.5", "--matryoshka-dims", "384, 128",
                                        "--matryoshka-weights", "1,0.5"]])
def test_the_run_identity_holds_the_loss_settings_as_given_in_the_configs_order(tmp_path, flags):
    cfg = parse_config(flags)
    identity = run_identity(cfg, 1, str(tmp_path), "none", "none")
    settings = {k: v for k, v in cfg.to_dict().items() if k not in MAY_CHANGE_ON_RESUME}
    for key in ("pooling", "query_prompt", "document_prompt", "include_prompt"):  # as the base's files resolve them
        settings[key] = identity[key]
    # the config's settings, in its order and spelling: the identity of an existing run (and its checkpoints) stays
    assert json.dumps({k: identity[k] for k in settings}) == json.dumps(settings)
    assert list(identity)[1 : 1 + len(settings)] == list(settings)


def test_an_objective_built_in_code_states_its_own_values():
    assert MNR(scale=5.0, dims=(8, 4), dim_weights=(1.0, 2.0)).identity() == {
        "scale": 5.0, "symmetric": False, "matryoshka_dims": "8,4", "matryoshka_weights": "1.0,2.0"}
