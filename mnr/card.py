"""The model card (README.md) of an exported model: YAML front matter the hub indexes, then what was trained
on what, the scores, and how to load the model with sentence-transformers and with plain transformers.

`model_card(info)` takes one dict; every key is optional:

    base_model          str   hub id (goes into the front matter) or local path (named in the text only)
    license             str   e.g. "apache-2.0", usually the base model's
    datasets            list  training data as given to --train-data: hub names ("snli", "glue/mnli",
                              "owner/name:config@split") go into the front matter; local files are named in the text
    train_data          str   one line describing the training data (default: the datasets)
    data_license        str   the training data's license, e.g. "CC BY-SA 4.0" (named in the text)
    data_stats          str   e.g. "9840 rows read, 3167 examples kept; skipped: ..."
    examples            int   training examples (pairs or triplets)
    steps               int   optimizer steps done
    weights_unchanged   bool  no optimizer step changed the base model's weights: the card says so first
    settings            dict  training settings, name -> value, shown as a table (loss, batch sizes, lr, ...)
    metrics             dict  evaluator -> metric -> {"before": x, "after": y, "scale": 100 or 1}; a bare number
                              is the score after training; scale 100 (Spearman x 100) prints 2 decimals, scale 1
                              (a 0-1 metric) 4; without "scale", a value beyond +-1 means x 100
    pooling             str   "mean", "cls" or "lasttoken"  } filled by mnr.model.save_model
    normalize           bool  a Normalize module follows     } from the pipeline it writes
    max_seq_length      int                                  }
    embedding_dim       int                                  }
    similarity_fn_name  str   "cosine", "dot", ...           }
    matryoshka_dims     list  embedding sizes trained at once (Matryoshka); the usage shows truncate_dim
    do_lower_case       bool                                 }
    query_prompt        str   put before queries ("" none)   }
    include_prompt      bool  False: the prompt's tokens are left out of the pooling }
    document_prompt     str   put before documents           }
    path                str   where the model is (hub id or directory) for the loading snippets; without it
                              they say "<path>" and the card explains what to put there

"""

from __future__ import annotations

import math

PLACEHOLDER = "<path>"
# the training data of a run without --train-data (mnr/resources/snli_sample.tsv.gz, README "Data attribution")
EMBEDDED_TRAIN_DATA = {"datasets": ["snli"], "data_license": "CC BY-SA 4.0",
                       "train_data": "the SNLI 1.0 dev split (9,840 labelled pairs, Bowman et al., EMNLP 2015), "
                                     "the sample shipped in mnr/resources (snli_sample.tsv.gz)"}
SMALL_DATA = 10_000  # fewer training examples than this: the limitations say the model is a small fine-tune
SAMPLE_SENTENCES = ["A man is playing a guitar.", "Someone is playing an instrument.", "A dog runs in the park."]

# The pooling function of the transformers snippet, per pooling mode; tests run it against mnr's own encode.
POOLING_CODE = {
    "mean": '''def pool(last_hidden_state, attention_mask):
    """Mean of the token embeddings, padding left out."""
    mask = attention_mask.unsqueeze(-1).float()
    return (last_hidden_state * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)''',
    "cls": '''def pool(last_hidden_state, attention_mask):
    """The embedding of each text's first token the mask marks ([CLS])."""
    first = attention_mask.argmax(dim=1)
    return last_hidden_state[torch.arange(last_hidden_state.shape[0]), first]''',
    "lasttoken": '''def pool(last_hidden_state, attention_mask):
    """The embedding of each text's last non-padding token (found by the mask: left or right padding)."""
    positions = torch.arange(attention_mask.shape[1])
    last = (attention_mask * positions).argmax(dim=1)
    return last_hidden_state[torch.arange(last_hidden_state.shape[0]), last]''',
}
# What each pooling is, in words (summary and usage).
POOLING_NAMES = {"mean": "mean of the token embeddings over the attention mask",
                 "cls": "embedding of the first token ([CLS])", "lasttoken": "embedding of the last non-padding token"}


def model_card(info: dict) -> str:
    """README.md text for an exported model; `info` as in the module docstring."""
    path = info.get("path") or PLACEHOLDER
    lines = ["---", _front_matter(info).rstrip("\n"), "---", "", f"# {_title(info)}", "", *_unchanged(info),
             _summary(info), ""]
    lines += _training(info) + _evaluation(info) + _intended_use(info) + _usage(info, path)
    return "\n".join(lines).rstrip("\n") + "\n"


def _number(value) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def hub_datasets(datasets: list[str]) -> list[str]:
    """Hub dataset names among --train-data sources ('glue/mnli' -> 'glue'); local files are left out."""
    from mnr.data import hub_spec, is_local

    names = [hub_spec(spec)[0] for spec in datasets if spec and not is_local(spec) and " " not in spec]
    return list(dict.fromkeys(names))


def _is_hub_id(name: str | None) -> bool:
    from pathlib import Path

    return bool(name) and not Path(name).exists() and not name.startswith((".", "/", "~")) and name.count("/") <= 1


def _front_matter(info: dict) -> str:
    import yaml

    meta: dict = {"library_name": "sentence-transformers", "pipeline_tag": "sentence-similarity",
                  "tags": ["sentence-transformers", "sentence-similarity", "feature-extraction",
                           "multiple-negatives-ranking-loss", "mnr"]}
    if _is_hub_id(info.get("base_model")):
        meta["base_model"] = info["base_model"]
        meta["base_model_relation"] = "finetune"
    datasets = hub_datasets(list(info.get("datasets") or []))
    if datasets:
        meta["datasets"] = datasets
    if info.get("license"):
        meta["license"] = str(info["license"])
    return yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)


def _title(info: dict) -> str:
    base = str(info.get("base_model") or "")
    name = base.rstrip("/").rsplit("/", 1)[-1] if base else ""
    return f"{name} fine-tuned with mnr" if name else "Sentence embedding model fine-tuned with mnr"


def _summary(info: dict) -> str:
    dim = f"a {info['embedding_dim']}-dimensional vector" if info.get("embedding_dim") else "a vector"
    pooling = info.get("pooling", "mean")
    steps = [f"transformer (texts truncated to {info['max_seq_length']} tokens)" if info.get("max_seq_length")
             else "transformer", POOLING_NAMES.get(pooling, f"{pooling} pooling")
             + ("" if info.get("include_prompt", True) else " (the prompt's tokens left out)")]
    if info.get("normalize"):
        steps.append("normalised to unit length")
    similarity = info.get("similarity_fn_name") or "cosine"
    text = (f"A sentence-embedding model: it maps a text to {dim} for semantic search, clustering and similarity. "
            f"Fine-tuned with Multiple Negatives Ranking loss (in-batch negatives) by mnr "
            f"from {_code(info.get('base_model')) or 'a transformer encoder'}.\n\n"
            f"Pipeline: {' -> '.join(steps)}. Similarity function: {similarity}.")
    if info.get("normalize"):
        text += " Embeddings have unit length, so dot product and cosine similarity agree."
    return text


def _unchanged(info: dict) -> list[str]:
    """The note of an export whose weights are its base model's (no optimizer step moved them)."""
    if not info.get("weights_unchanged"):
        return []
    steps = info.get("steps")
    done = "no optimizer step" if not steps else f"{steps} optimizer step{'' if steps == 1 else 's'}"
    return [f"> **The weights are the base model's, unchanged**: training did {done}, none at a learning rate "
            f"above 0 (the linear warm-up gives the first step learning rate 0), so this model embeds exactly as its "
            f"base model does.", ""]


def _intended_use(info: dict) -> list[str]:
    """The sections a hub card is expected to have: what the model is for, and where it falls short."""
    limits = ["It was fine-tuned with in-batch negatives: texts of one batch that happen to be paraphrases count "
              "as negatives, and it learns only what separates the training pairs from each other."]
    if info.get("max_seq_length"):
        limits.append(f"Texts longer than {info['max_seq_length']} tokens are truncated: only their beginning is "
                      f"embedded.")
    examples = info.get("examples")
    if isinstance(examples, int) and examples < SMALL_DATA:
        limits.append(f"It saw only {examples} training examples: treat it as a demonstration or a starting point, "
                      f"and check it on data of your own before relying on it.")
    limits.append("Scores above hold for the evaluation sets named there; other domains, languages and text "
                  "lengths may score lower. The model carries the biases of its base model and its training data.")
    return ["## Intended use", "",
            "Embedding sentences and short paragraphs for semantic search, clustering and semantic similarity, in "
            "the language and domain of the training data. Not for generating text, nor for decisions about "
            "people without a human check.", "", "## Limitations", "", *[f"- {line}" for line in limits], ""]


def _code(value) -> str:
    return f"`{value}`" if value else ""


def _training(info: dict) -> list[str]:
    lines = ["## Training", ""]
    facts = [("Base model", _code(info.get("base_model"))),
             ("Training data", info.get("train_data") or ", ".join(map(str, info.get("datasets") or []))),
             ("Data license", info.get("data_license")), ("Data", info.get("data_stats")),
             ("Training examples", info.get("examples")),
             ("Optimizer steps", info.get("steps"))]
    lines += [f"- {label}: {value}" for label, value in facts if value not in (None, "")]
    settings = info.get("settings") or {}
    if settings:
        lines += ["", "| setting | value |", "|---|---|"]
        lines += [f"| {name} | {_setting(value)} |" for name, value in settings.items()]
    return lines + [""]


def _setting(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _evaluation(info: dict) -> list[str]:
    metrics = info.get("metrics") or {}
    rows = []
    for evaluator, by_metric in metrics.items():
        for metric, value in (by_metric or {}).items():
            value = value if isinstance(value, dict) else {"after": value}
            scale = value.get("scale") or _guess_scale(value.get("before"), value.get("after"))
            rows.append(f"| {evaluator} | {metric} | {format_metric(value.get('before'), scale)} | "
                        f"{format_metric(value.get('after'), scale)} |")
    if not rows:
        return []
    return ["## Evaluation", "", "| evaluator | metric | before training | after training |", "|---|---|---:|---:|",
            *rows, ""]


def _guess_scale(*values) -> int:
    return 100 if any(abs(_number(v) or 0.0) > 1.0 for v in values) else 1


def format_metric(value, scale: int = 100) -> str:
    """2 decimals for a x 100 metric, 4 for a 0-1 metric; '-' when not measured."""
    number = _number(value)
    if number is None:
        return "-"
    if math.isnan(number):
        return "nan"
    return f"{number:.2f}" if scale == 100 else f"{number:.4f}"


def _usage(info: dict, path: str) -> list[str]:
    pooling = info.get("pooling", "mean")
    if pooling not in POOLING_CODE:
        raise ValueError(f"pooling={pooling!r} has no transformers snippet; known: {', '.join(POOLING_CODE)}")
    lines = ["## Usage", ""]
    if path == PLACEHOLDER:
        lines += [(f"Replace `{PLACEHOLDER}` with the directory that holds this card (the training run's output "
                   f"directory) or, once uploaded, the model's hub id (`owner/name`)."), ""]
    query, document = info.get("query_prompt") or "", info.get("document_prompt") or ""
    if query or document:
        lines += [(f"Prompts: the model was trained with {query!r} before every query and {document!r} before "
                   f"every document; they are saved with it (`prompt_name=\"query\"` / `\"document\"`, or "
                   f"`encode_query` / `encode_document`). For symmetric similarity (STS) both sides take the query "
                   f"prompt, as below and in mnr's evaluation."), ""]
    prompt_arg = ', prompt_name="query"' if query else ""
    lines += ["With sentence-transformers:", "", "```python", "from sentence_transformers import SentenceTransformer",
              "", f"model = SentenceTransformer({path!r})", f"sentences = {SAMPLE_SENTENCES!r}",
              f"embeddings = model.encode(sentences{prompt_arg})",
              "print(model.similarity(embeddings, embeddings))", "```", ""]
    lines += _truncate_usage(info, path)
    return lines + _transformers_usage(info, path, pooling, query)


def _transformers_usage(info: dict, path: str, pooling: str, query: str) -> list[str]:
    """The plain-transformers snippet: tokenise (prompt first), run the model, pool as the export does."""
    length = f", max_length={info['max_seq_length']}" if info.get("max_seq_length") else ""
    lines = [f"With transformers only (the same embeddings; pooling: {pooling}, the "
             f"{POOLING_NAMES.get(pooling, pooling)}):", "", "```python", "import torch"]
    if info.get("normalize"):
        lines.append("import torch.nn.functional as F")
    lines += ["from transformers import AutoModel, AutoTokenizer", "", "", POOLING_CODE[pooling], "", "",
              f"tokenizer = AutoTokenizer.from_pretrained({path!r})", f"model = AutoModel.from_pretrained({path!r})",
              "model.eval()", f"sentences = {SAMPLE_SENTENCES!r}"]
    texts = "sentences"
    if query:
        lines.append(f"prompt = {query!r}  # the query prompt; documents take {info.get('document_prompt') or ''!r}")
        texts = "[prompt + s for s in sentences]"
    if info.get("do_lower_case"):  # sentence-transformers lower-cases the text, prompt included
        texts = "[(prompt + s).lower() for s in sentences]" if query else "[s.lower() for s in sentences]"
    lines += [f"batch = tokenizer({texts}, padding=True, truncation=True{length}, return_tensors='pt')",
              "with torch.no_grad():", "    output = model(**batch)"]
    mask = "batch['attention_mask']"
    if query and not info.get("include_prompt", True):  # sentence-transformers' Pooling(include_prompt=False)
        alone = "prompt.lower()" if info.get("do_lower_case") else "prompt"
        lines += [f"ids = tokenizer({alone})['input_ids']  # the prompt alone, less the special token that ends it",
                  "prompt_length = len(ids) - (ids[-1] in tokenizer.all_special_ids)",
                  f"mask = {mask} * ({mask}.cumsum(dim=1) > prompt_length)  # the prompt's tokens left out"]
        mask = "mask"
    lines += [f"embeddings = pool(output.last_hidden_state, {mask})"]
    if info.get("normalize"):
        lines.append("embeddings = F.normalize(embeddings, p=2, dim=1)")
    lines += ["```", "", ("`output.pooler_output` is not the sentence embedding: mnr does not train the pooler head "
                          "(its weights are the base model's)."), ""]
    return lines


def _truncate_usage(info: dict, path: str) -> list[str]:
    """Matryoshka models: loading at a smaller size (the first d coordinates; cosine re-normalises them)."""
    dims = sorted({int(d) for d in info.get("matryoshka_dims") or []}, reverse=True)
    smaller = [d for d in dims if not info.get("embedding_dim") or d < int(info["embedding_dim"])]
    if not smaller:
        return []
    return [f"Trained as a Matryoshka model at sizes {', '.join(map(str, dims))} (the first d coordinates of the "
            f"embedding work alone). Smaller, faster embeddings:", "", "```python",
            "from sentence_transformers import SentenceTransformer", "",
            f"model = SentenceTransformer({path!r}, truncate_dim={smaller[0]})",
            f"embeddings = model.encode({SAMPLE_SENTENCES!r})  # shape (3, {smaller[0]})",
            "print(model.similarity(embeddings, embeddings))  # cosine: the truncated vectors are re-normalised",
            "```", ""]
