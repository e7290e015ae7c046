"""What the three command lines share: `train_mnr.py` (`mnr-train`), `python -m mnr.evaluate`, `python -m mnr.mine`.

* `Parser`: argparse with one-line errors (an unknown flag gets "did you mean"), no abbreviations, printed once.
* `run(body)`: a user error (ValueError, OSError and the types given) ends in one line `error: ...` and exit
  code 2, printed once, by rank 0 (every process meets the same error); MNR_DEBUG=1 raises it instead, for the
  traceback.  The process group is left in a finally, while the interpreter is whole (gloo aborts at exit
  otherwise, now and then).
* The flags the three share, spelt alike and checked by the rules of training's TrainConfig (mnr/config.py):
  --max-seq-length and --batch-size (`add_encoding_flags`, `check_encoding_flags`), --trust-remote-code,
  --query-prompt, --document-prompt and --pooling (`add_model_flags`); `check_fits` once the model is loaded.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from typing import Callable

from mnr import distributed

POOLING_CHOICES = ("mean", "cls", "lasttoken")
DEFAULT_SEQ_LENGTH = 128  # --max-seq-length of mnr.evaluate and mnr.mine when not given (or the model's limit)


def debug() -> bool:
    """MNR_DEBUG set (and not 0): user errors raise, for the traceback."""
    return os.environ.get("MNR_DEBUG", "").strip() not in ("", "0")


def say(message: str) -> None:
    """Print to stderr once per launch: from the process the launcher gave rank 0."""
    if distributed.launched_rank() == 0:
        print(message, file=sys.stderr)


def run(body: Callable[[], int], errors: tuple[type[BaseException], ...] = ()) -> int:
    """body() -> its exit code; a user error (ValueError, OSError, `errors`) -> `error: ...` once and 2."""
    try:
        try:
            return body()
        except (ValueError, OSError, *errors) as err:
            if debug():
                raise
            message = f"error: {err}"
        except KeyboardInterrupt:  # Ctrl-C: one line, the shell's exit code for SIGINT, no traceback
            if debug():
                raise
            say("interrupted (Ctrl-C): stopped, nothing written")
            return 130
        say(message)  # out of the except block: the traceback, and the objects its frames hold, are gone
        return 2
    finally:
        distributed.shutdown()


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: an unknown flag gets "did you mean" (`aliases`: names users bring from
    other tools -> ours), not a page of usage.  Abbreviations are refused: --max-step must not mean --max-steps."""

    def __init__(self, *args, aliases: dict[str, str] | None = None, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.aliases = dict(aliases or {})

    def error(self, message: str):  # noqa: D102 - argparse's hook
        say(f"error: {self.suggest(message)} (see --help)")
        self.exit(2)

    def suggest(self, message: str) -> str:
        """argparse's message, with "unknown flag X; did you mean Y?" for each unknown flag."""
        if not message.startswith("unrecognized arguments:"):
            return message
        flags = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
        parts = []
        for typed in message.split(":", 1)[1].split():
            if not typed.startswith("-"):
                continue  # the value of an unknown flag (or a stray word): the flag is what to fix
            name = typed.split("=", 1)[0]
            bare = name.lstrip("-").replace("-", "_")
            dashed = "--" + bare.replace("_", "-")
            guess = ([f"--{self.aliases[bare].replace('_', '-')}"] if bare in self.aliases else [dashed]
                     if dashed in flags else difflib.get_close_matches(dashed, flags, n=2, cutoff=0.75))
            parts.append(f"unknown flag {name}" + (f"; did you mean {' / '.join(guess)}?" if guess else ""))
        return "; ".join(parts) or message


class _Renamed(argparse.Action):
    """Stores its value; a deprecated spelling of the flag (`renamed`: old -> new) warns."""

    def __init__(self, option_strings, dest, renamed: dict[str, str] | None = None, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.renamed = renamed or {}

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in self.renamed:
            say(f"warning: {option_string} is deprecated; use {self.renamed[option_string]}")
        setattr(namespace, self.dest, values)


def add_encoding_flags(parser: argparse.ArgumentParser, batch_size: int = 64) -> None:
    """--max-seq-length (default None: see `check_fits`) and --batch-size, as `check_encoding_flags` checks them."""
    from mnr.config import MIN_SEQ_LENGTH

    parser.add_argument("--max-seq-length", type=int, default=None,
                        help=f"truncate every text to this many tokens (at least {MIN_SEQ_LENGTH}, at most the "
                             f"model's positions; default {DEFAULT_SEQ_LENGTH}, or the model's positions when fewer)")
    parser.add_argument("--batch-size", type=int, default=batch_size,
                        help=f"texts encoded at once per process (default {batch_size})")


def add_model_flags(parser: argparse.ArgumentParser, renamed: dict[str, str] | None = None) -> None:
    """--trust-remote-code, --query-prompt, --document-prompt, --pooling and --include-prompt; each defaults to
    the model's saved one (mnr.model.choose_pipeline).  renamed: a deprecated spelling -> its flag here."""
    from mnr.config import TYPED_NEWLINE, typed_text

    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow model repos that ship their own Python code (off: never run it)")
    for role, example in (("query", "query: "), ("document", "passage: ")):
        flag = f"--{role}-prompt"
        old = {o: n for o, n in (renamed or {}).items() if n == flag}
        parser.add_argument(flag, *old, dest=f"{role}_prompt", default=None, action=_Renamed, renamed=old,
                            type=typed_text,
                            help=f"text put before every {role} (e.g. {example!r}); default: the model's saved "
                                 f"{role!r} prompt (config_sentence_transformers.json), if any; '' for none; "
                                 f"{TYPED_NEWLINE}" + (f" ({', '.join(old)}: the same, deprecated)" if old else ""))
    parser.add_argument("--pooling", default="", choices=["", *POOLING_CHOICES],
                        help="override the model's saved pooling (default: the model's)")
    parser.add_argument("--include-prompt", action=argparse.BooleanOptionalAction, default=None,
                        help="whether the prompt's tokens count in the pooled embedding (default: the model's "
                             "saved include_prompt, 1_Pooling/config.json)")


def check_encoding_flags(args: argparse.Namespace) -> None:
    """--batch-size and --max-seq-length by training's rules, before any model is loaded (ConfigError)."""
    from mnr.config import check_seq_length, require

    require(args.batch_size >= 1, "--batch-size", args.batch_size, "must be >= 1")
    if args.max_seq_length is not None:
        check_seq_length(args.max_seq_length, name="--max-seq-length")


def check_prompt_room(policy, prompts, name: str = "--max-seq-length") -> None:
    """ConfigError for a prompt that takes the whole of the policy's max length: every text would be cut to its
    prompt alone (all texts the same embedding, or, with the prompt left out of the pooling, none).  `prompts`:
    (query prompt, document prompt) pairs."""
    from mnr.config import ConfigError

    for pair in prompts:
        for role, prompt in zip(("query", "document"), pair):
            n = policy.prompt_tokens(prompt)
            if prompt and n >= policy.max_length:
                shown = prompt if len(prompt) <= 40 else prompt[:37] + "..."
                raise ConfigError(f"the {role} prompt {shown!r} is {n} tokens with the special tokens: {name} "
                                  f"{policy.max_length} leaves no room for the text; raise {name} or shorten "
                                  f"the prompt")


def check_fits(max_seq_length: int | None, encoder, name: str = "--max-seq-length") -> int:
    """The max length to use with the loaded model: the given one, checked against the model's position limit
    (the one check of it: ConfigError naming `name`); None: DEFAULT_SEQ_LENGTH, or the limit when lower."""
    from mnr.config import check_seq_length
    from mnr.model import max_positions

    limit = max_positions(encoder)
    if max_seq_length is None:
        return DEFAULT_SEQ_LENGTH if limit is None else min(DEFAULT_SEQ_LENGTH, limit)
    check_seq_length(max_seq_length, limit, name)
    return max_seq_length
