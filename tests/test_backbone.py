"""The backbone: one tokenisation policy for the store, the collator, the evaluators, mine and the run identity;
loading that refuses model files that disagree; the collective export."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import build_tiny_model, train_args, write_tsv
from mnr.backbone import Backbone, TokenPolicy, pad_tokens
from mnr.batching import Collator
from mnr.model import ModelError
from mnr.store import prepare_train_store

UPPER = ["A MAN IS PLAYING WITH A DOG", "TWO CHILDREN SITTING", "a Red Car near THE house"]


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _as_saved(model: Path) -> None:
    """The tokenizer as tokenizer.json says (transformers' BertTokenizer rebuilds its normalizer and
    post-processor from tokenizer_config.json; the generic fast tokenizer reads them from tokenizer.json)."""
    _edit_json(model / "tokenizer_config.json", lambda c: c.update(tokenizer_class="PreTrainedTokenizerFast"))


@pytest.fixture()
def cased_model(tmp_path) -> Path:
    """The tiny BERT with a cased tokenizer (its vocabulary is lower-case: capitals are unknown) and a
    sentence-transformers config that lower-cases the text (do_lower_case: true)."""
    from test_model import st_base

    path = st_base(build_tiny_model(tmp_path / "tiny"), tmp_path / "cased", pooling="mean", normalize=False,
                   max_seq_length=32)
    _as_saved(path)
    _edit_json(path / "tokenizer.json", lambda t: t["normalizer"].update(lowercase=False))
    (path / "config_sentence_transformers.json").write_text(json.dumps({"prompts": {}, "similarity_fn_name": "cosine"}))
    return path


def test_pad_tokens_pads_on_either_side():
    tokens, starts, lengths = np.arange(10, 16), np.array([0, 3]), np.array([3, 1])
    ids, mask = pad_tokens(tokens, starts, lengths, 0, "right")
    assert ids.tolist() == [[10, 11, 12], [13, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_tokens(tokens, starts, lengths, 0, "left")
    assert ids.tolist() == [[10, 11, 12], [0, 0, 13]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_the_policy_lower_cases_prompt_and_text_when_the_base_says_so(cased_model):
    backbone = Backbone.load(str(cased_model), 32, query_prompt="Query: ")
    policy = backbone.policy
    assert policy.do_lower_case and policy.texts(["A Man"], "query") == ["query: a man"]
    unk = backbone.tokenizer.unk_token_id
    values, _ = policy.tokenise(UPPER)
    assert unk not in values.tolist()  # capitals are unknown to the cased vocabulary: the text was lower-cased
    assert policy.tokenise(UPPER)[0].tolist() == policy.tokenise([t.lower() for t in UPPER])[0].tolist()


def test_the_store_the_evaluators_and_mine_lower_case_as_sentence_transformers_does(cased_model, tmp_path):
    from sentence_transformers import SentenceTransformer

    from mnr.evaluate import encode
    from mnr.mine import _encoder_embed

    backbone = Backbone.load(str(cased_model), 32)
    st = SentenceTransformer(str(cased_model), device="cpu")
    theirs = torch.from_numpy(st.encode(UPPER))
    assert (encode(backbone, UPPER, 32) - theirs).abs().max() < 1e-5  # the evaluators
    pairs = write_tsv(tmp_path / "pairs.tsv", ["anchor", "positive"], [UPPER[:2], UPPER[1:]])
    store = prepare_train_store(str(pairs), backbone.policy, 32, False, str(tmp_path / "cache"))
    want = backbone.tokenizer([t.lower() for t in UPPER[:2]], truncation=True, max_length=32)["input_ids"]
    assert [store.token_ids[int(t)].tolist() for t in store.text_ids[0]] == want  # the training store
    args = type("Args", (), dict(model=str(cased_model), max_seq_length=32, batch_size=8, trust_remote_code=False,
                                 pooling="", query_prompt=None, document_prompt=None, include_prompt=None))()
    queries, _ = _encoder_embed(args, torch.device("cpu"))
    assert (queries(UPPER) - theirs).abs().max() < 1e-5  # mnr.mine


def test_an_edited_tokenizer_json_or_truncation_side_builds_a_new_store(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    _as_saved(model)
    pairs = write_tsv(tmp_path / "pairs.tsv", ["anchor", "positive"],
                      [["a man is playing with a dog outside", "two children sitting in the house"]])
    cache = str(tmp_path / "cache")
    tok = AutoTokenizer.from_pretrained(model)
    first = prepare_train_store(str(pairs), tok, 5, False, cache)
    tok.truncation_side = "left"
    left = prepare_train_store(str(pairs), tok, 5, False, cache)
    assert left.path != first.path
    assert left.token_ids[0].tolist() != first.token_ids[0].tolist()  # the end of the text, not its start
    # the post-processor edited in place: no [SEP] at the end of a single text
    _edit_json(model / "tokenizer.json", lambda t: t["post_processor"].update(
        single=[s for s in t["post_processor"]["single"] if s.get("SpecialToken", {}).get("id") != "[SEP]"]))
    edited = AutoTokenizer.from_pretrained(model)
    again = prepare_train_store(str(pairs), edited, 5, False, cache)
    assert again.path != first.path
    assert again.token_ids[0].tolist() == edited("a man is playing with a dog outside", truncation=True,
                                                 max_length=5)["input_ids"]


def test_the_fingerprint_does_not_move_with_a_tokenizer_call(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    before = TokenPolicy.of(tok, 32).fingerprint()
    tok(["a man"], padding="max_length", truncation=True, max_length=7)  # sets the backend's truncation and padding
    assert TokenPolicy.of(tok, 32).fingerprint() == before
    tok.padding_side = "left"
    assert TokenPolicy.of(tok, 32).fingerprint() != before


def test_collator_and_evaluators_pad_on_the_policys_side(tiny_model, tmp_path):
    """A tokenizer that pads on the left: training batches and evaluation batches both pad on the left, so a
    text embeds the same in both (absolute positions: the side changes the embedding)."""
    from mnr.config import TrainConfig
    from mnr.evaluate import encode
    from mnr.train import _setup_data

    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    _edit_json(model / "tokenizer_config.json", lambda c: c.update(padding_side="left"))
    backbone = Backbone.load(str(model), 32)
    assert backbone.policy.padding_side == "left"
    texts = ["a man is playing with a dog outside", "two children"]
    pairs = write_tsv(tmp_path / "pairs.tsv", ["anchor", "positive"], [texts, ["a red car", "the house"]])
    cfg = TrainConfig(train_data=str(pairs), max_seq_length=32, cache_dir=str(tmp_path / "cache"), batch_size=2)
    accelerator = type("Acc", (), {"num_processes": 1, "is_local_main_process": True})()
    _, collator, _, _ = _setup_data(cfg, str(pairs), backbone.policy, accelerator)
    batch = collator(np.arange(1))
    assert batch["attention_mask"][:, 0].tolist() == [1, 0]  # the short text padded on the left
    with torch.no_grad():
        trained = backbone.embed(batch["input_ids"], batch["attention_mask"])
    evaluated = encode(backbone, texts, 32)
    assert (trained - evaluated).abs().max() < 1e-5
    right = Collator(collator.token_ids, collator.text_ids, 0)(np.arange(1))
    with torch.no_grad():
        assert (backbone.embed(right["input_ids"], right["attention_mask"]) - evaluated).abs().max() > 1e-4


def test_switching_the_tokenizer_refuses_to_resume_naming_it(tiny_model, tmp_path):
    from mnr.checkpoint import CheckpointError, TrainState, run_identity
    from mnr.config import parse_config

    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    cfg = parse_config(train_args(model, "x.tsv", tmp_path / "out"))
    saved = run_identity(cfg, 1, str(model), "x.tsv", "none")
    _edit_json(model / "tokenizer_config.json", lambda c: c.update(do_lower_case=False))  # a cased tokenizer
    now = run_identity(cfg, 1, str(model), "x.tsv", "none")
    with pytest.raises(CheckpointError, match=r"tokenizer: '[0-9a-f]+' -> '[0-9a-f]+'") as err:
        TrainState(run_identity=saved).check_same_run(now, tmp_path / "out" / "checkpoint-1")
    assert "model_files" not in str(err.value)  # only the tokenizer changed
    _edit_json(model / "tokenizer_config.json", lambda c: c.update(truncation_side="left"))
    changes = TrainState(run_identity=now)
    with pytest.raises(CheckpointError, match="truncation_side: 'right' -> 'left'"):
        changes.check_same_run(run_identity(cfg, 1, str(model), "x.tsv", "none"), "ckpt")


# ---------------------------------------------------------------------------------------------
# model files that do not agree: one line naming the file, through every command


def _no_tokenizer(model: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink()


def _more_tokens(model: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    tok.add_tokens(["zyxwv", "qponm", "lkjih"])
    tok.save_pretrained(model)


def _config_mismatch(model: Path) -> None:
    _edit_json(model / "config.json", lambda c: c.update(hidden_size=64, intermediate_size=128))


BROKEN = {
    "no tokenizer files": (_no_tokenizer, r"tokenizer has 5 tokens for an embedding of \d+ rows \(no tokenizer.json"),
    "tokenizer ids beyond the embedding": (_more_tokens, r"ids up to \d+, beyond config.json's vocab_size"),
    "config.json sizes": (_config_mismatch, r"config.json does not match the weights: .* in model.safetensors"),
    "empty modules.json": (lambda m: (m / "modules.json").write_text(""), r"modules.json is not valid JSON"),
    "modules.json []": (lambda m: (m / "modules.json").write_text("[]"), r"modules.json lists no sentence-transf"),
    "invalid tokenizer_config.json": (lambda m: (m / "tokenizer_config.json").write_text("{"),
                                      r"tokenizer_config.json is not valid JSON"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_model_whose_files_disagree_is_one_line_naming_the_file(case, tiny_model, tmp_path):
    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    damage, message = BROKEN[case]
    damage(model)
    with pytest.raises(ModelError, match=message) as err:
        Backbone.load(str(model))
    assert "\n" not in str(err.value) and str(model) in str(err.value)


@pytest.mark.parametrize("command", ["train", "evaluate", "mine"])
@pytest.mark.parametrize("case", ["no tokenizer files", "config.json sizes", "empty modules.json"])
def test_every_command_refuses_such_a_model_the_same_way(command, case, tiny_model, nli_file, tmp_path, capsys):
    import mnr.evaluate
    import mnr.mine
    import mnr.train

    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    damage, message = BROKEN[case]
    damage(model)
    argv = {"train": train_args(model, nli_file, tmp_path / "out", "--eval-data", "none"),
            "evaluate": [str(model), "--data", str(nli_file)],
            "mine": [str(nli_file), "--output", str(tmp_path / "mined.tsv"), "--model", str(model)]}[command]
    main = {"train": mnr.train.main, "evaluate": mnr.evaluate.main, "mine": mnr.mine.main}[command]
    try:
        assert main(argv) == 2
    finally:  # a later test's Accelerator may ask for another precision
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(True)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    assert __import__("re").search(message, err[0]), err[0]


def test_an_unreachable_hub_warns_once_per_retry_and_suggests_offline_mode(monkeypatch, capfd):
    import transformers

    hub_logger = logging.getLogger("huggingface_hub.utils._http")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def unreachable(*args, **kwargs):  # what the hub's retries print, then transformers' final error
        hub_logger.warning("Retrying in 8s [Retry 1/5].")
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them "
                      "in the cached files.")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", unreachable)
    root_handler = logging.StreamHandler(sys.stderr)  # mnr's own log handler (setup_logging) on the root logger
    logging.getLogger().addHandler(root_handler)
    hub_handlers = logging.getLogger("huggingface_hub").handlers  # its own, made at import: on this stderr too
    streams = [h.setStream(sys.stderr) for h in hub_handlers]
    try:
        with pytest.raises(ModelError, match="HF_HUB_OFFLINE=1 .* or pass a local model directory") as err:
            Backbone.load("some-org/some-model")
    finally:
        logging.getLogger().removeHandler(root_handler)
        for h, stream in zip(hub_handlers, streams):
            h.setStream(stream)
    assert "couldn't connect" in str(err.value)
    assert capfd.readouterr().err.count("Retrying in 8s") == 1


# ---------------------------------------------------------------------------------------------
# the collective export


def test_export_gathers_on_every_process_and_writes_on_the_main_one(tiny_model, tmp_path, monkeypatch):
    from mnr import distributed

    backbone = Backbone.load(str(tiny_model), 32)
    gathered = []
    real = Backbone.state_dict
    monkeypatch.setattr(Backbone, "state_dict", lambda self: gathered.append(1) or real(self))
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    backbone.export(tmp_path / "other", then=lambda p: (p / "then").write_text("x"))
    assert gathered == [1] and not (tmp_path / "other").exists()  # took part, wrote nothing
    monkeypatch.setattr(distributed, "is_main", lambda: True)
    backbone.export(tmp_path / "main", then=lambda p: (p / "then").write_text("x"))
    assert gathered == [1, 1] and (tmp_path / "main" / "model.safetensors").is_file()
    assert (tmp_path / "main" / "then").is_file()
    (tmp_path / "blocked").write_text("a file where the directory goes")
    with pytest.raises(OSError):
        backbone.export(tmp_path / "blocked")


def test_wrap_transformer_is_the_adapters_hook(tiny_model):
    backbone = Backbone.load(str(tiny_model), 32)
    inner = backbone.encoder.transformer
    wrapper = torch.nn.Module()
    backbone.wrap_transformer(lambda transformer: wrapper)
    assert backbone.encoder.transformer is wrapper and inner is not wrapper
    backbone.attach(backbone.encoder)
    with pytest.raises(RuntimeError, match="after the model was prepared"):
        backbone.wrap_transformer(lambda transformer: transformer)


def test_the_cards_snippets_lower_case_as_the_policy_does(cased_model, tmp_path):
    from mnr.card import PLACEHOLDER
    from mnr.evaluate import encode
    from test_card import python_blocks

    backbone = Backbone.load(str(cased_model), 32)
    backbone.export(tmp_path / "out", 32)
    for code in python_blocks((tmp_path / "out" / "README.md").read_text()):  # sentence-transformers, transformers
        scope: dict = {}
        exec(code.replace(PLACEHOLDER, str(tmp_path / "out")), scope)  # noqa: S102 - the card's own code
        assert any(c.isupper() for s in scope["sentences"] for c in s)
        assert (torch.as_tensor(scope["embeddings"]) - encode(backbone, scope["sentences"], 32)).abs().max() < 1e-5
