"""Encoder: masked mean pooling, no pooler head, clear errors for bad model directories."""

import pytest
import torch

from mnr.model import ModelError, check_model_dir, load_encoder, mean_pool


def test_mean_pool_ignores_padding():
    tokens = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]],
                           [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.allclose(mean_pool(tokens, mask), torch.tensor([[2.0, 3.0], [7.0, 8.0]]))


def test_padding_does_not_change_embeddings(tiny_model):
    encoder, tok = load_encoder(str(tiny_model))
    encoder.eval()
    short = tok(["a man is playing"], return_tensors="pt")
    padded = tok(["a man is playing", "a woman is sitting near a red car in the street"], padding=True,
                 return_tensors="pt")
    with torch.no_grad():
        alone = encoder(short["input_ids"], short["attention_mask"])
        batch = encoder(padded["input_ids"], padded["attention_mask"])
    assert padded["attention_mask"][0].sum() < padded["attention_mask"].shape[1]
    assert torch.allclose(alone[0], batch[0], atol=1e-5)


def test_encoder_has_no_pooler_and_every_parameter_gets_a_gradient(tiny_model):
    encoder, tok = load_encoder(str(tiny_model))
    assert not any("pooler" in n for n, _ in encoder.named_parameters())
    batch = tok(["a dog runs", "a cat sleeps"], padding=True, return_tensors="pt")
    encoder(batch["input_ids"], batch["attention_mask"]).sum().backward()
    no_grad = [n for n, p in encoder.named_parameters() if p.grad is None]
    assert no_grad == []


def test_not_a_model_directory(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ModelError, match="not a model directory"):
        load_encoder(str(tmp_path))


def test_checkpoint_without_safetensors_is_refused(tmp_path, tiny_model):
    import shutil

    bad = tmp_path / "pickled"
    shutil.copytree(tiny_model, bad)
    (bad / "model.safetensors").rename(bad / "pytorch_model.bin")
    with pytest.raises(ModelError, match="no safetensors weights .*pytorch_model.bin"):
        check_model_dir(str(bad))


def test_missing_hub_model_offline_is_a_clear_error():
    with pytest.raises(ModelError, match="cannot be loaded"):
        load_encoder("no-such-org/no-such-model-xyz")
