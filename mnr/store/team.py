"""The coordination of a store build over the processes of a launch: who builds (one process per machine whose
cache dir is the same directory, every process with a Python tokenizer), the file lock, the shares, and one
failure raised on every process.

  * Built once per filesystem (a file lock; other launches wait for it, then map the result): a crash or Ctrl-C
    mid-build leaves nothing that a later run trusts.  A store that cannot be trusted is rebuilt.
  * The machines of a launch whose cache dirs are one directory build it together (`prepare_train_store`):
    the first process of each machine (every process, with a Python tokenizer, which uses one core) tokenises
    a share of the texts (chunk c is member c % n's), the leader joins the shares in text-id order.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mnr.atomic import ExclusiveLock
from mnr.collective import together
from mnr.data import DataError, default_cache_dir, split_specs
from mnr.store.build import Build, no_cyclic_gc, python_only, tokenise_chunk, tokenise_share, tokenizer_threads
from mnr.store.format import Prompts, TokenStore, check_store, open_store, store_fingerprint

logger = logging.getLogger("mnr.store")


def _alone(obj) -> list:
    return [obj]


@dataclass
class Team:
    """The processes of one launch, as the store needs them: this one's `rank`, whether it is the first process
    of its machine (`local_main`: only those build or tokenise), and `gather(obj)`, a collective that every
    process calls with a picklable object and that returns all of them in rank order.  The default is a single
    process."""

    rank: int = 0
    local_main: bool = True
    gather: Callable[[object], list] = _alone


def _builders(team: Team, cache: Path, every_process: bool = False) -> list[int]:
    """The ranks that build this process's store together: the first process of each machine (`every_process`:
    every process) whose cache dir is the same directory as this one's, seen through a probe file each of them
    leaves; [] for a process that takes no part.  The lowest rank of them leads."""
    helps = team.local_main or every_process
    probe = cache / f".probe-{uuid.uuid4().hex}" if helps else None

    def leave_probe():
        if probe is not None:
            try:
                probe.touch()
            except OSError as err:
                raise DataError(f"cannot write to the token cache dir {cache} ({err.strerror}); "
                                f"pass a writable --cache-dir") from None
        return probe and probe.name

    names = together(team.gather, leave_probe)
    try:
        views = together(team.gather, lambda: [r for r, name in enumerate(names)
                                         if name and (cache / name).exists()] if helps else [])
    finally:
        if probe is not None:
            probe.unlink(missing_ok=True)
    if not helps:
        return []
    leader = min(views[team.rank])
    return [r for r, seen in enumerate(views) if seen and min(seen) == leader]


def _replace_stale(final: Path, fingerprint: str) -> bool:
    """Under the store's lock: False when `final` is complete (another launch built it); else True, with a damaged
    store and the temporary dirs of killed builds removed."""
    problem = check_store(final, fingerprint)
    if problem is None:
        return False
    if final.exists():
        logger.warning("token store %s cannot be trusted (%s): rebuilding it", final, problem)
        trash = final.parent / f"{final.name}.bad-{uuid.uuid4().hex[:8]}"
        os.replace(final, trash)
        shutil.rmtree(trash, ignore_errors=True)
    for stale in final.parent.glob(f"{final.name}.tmp-*"):  # left by a killed build (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    return True


def prepare_train_store(specs: str | list[str], tokenizer, max_seq_length: int, hard_negatives: bool | None,
                        cache_dir: str = "", prompts: Prompts = ("", ""), team: Team | None = None) -> TokenStore:
    """The token store of these sources, built if missing or damaged, then memory-mapped; `prompts` =
    (query prompt, document prompt), put before the anchors and before the positives and negatives.

    Every process of a launch calls it at once, with its `team` (default: one process).  A store that all find
    complete is mapped.  Else the machines whose cache dirs are one directory (`_builders`) build it together:
    the lowest rank takes the file lock (another launch building it makes this one wait, then map it) and reads,
    then every one of those machines (processes, with a Python tokenizer) tokenises its share, and the leader
    joins the shares and renames.
    Any process's failure is raised on all of them."""
    team = team or Team()
    tokenise_chunk()  # a bad $MNR_TOKENISE_CHUNK is refused before any work
    specs, cache = split_specs(specs), Path(cache_dir or default_cache_dir())
    looks = together(team.gather, lambda: _look(cache, specs, hard_negatives, tokenizer, max_seq_length, prompts))
    fingerprint, what, _ = looks[team.rank]
    final = cache / f"store-{fingerprint}"
    if all(ok for _, _, ok in looks):
        return open_store(final)
    # a fast tokenizer uses every core of its machine; a Python one uses one, so every process takes a share
    builders = _builders(team, cache, every_process=python_only(tokenizer))
    leads = bool(builders) and builders[0] == team.rank
    lock = ExclusiveLock(str(final) + ".lock")  # removed on release: no store-*.lock left in the cache
    build: Build | None = None

    def read():
        nonlocal build
        if not leads:
            return None
        lock.acquire()
        if not _replace_stale(final, fingerprint):
            return None
        split = f", the tokenising split over {len(builders)} processes" if len(builders) > 1 else ""
        logger.info("building the token store %s%s", final, split)
        build = Build(final, len(builders))
        build.read(specs, tokenizer, max_seq_length, hard_negatives, prompts)
        return str(build.tmp)

    def tokenise():
        if build is not None:
            build.wait()
        elif builders and not leads and plans[builders[0]] is not None:
            member = builders.index(team.rank)
            n = tokenise_share(Path(plans[builders[0]]), member, tokenizer, max_seq_length)
            logger.info("tokenised %d texts of %s (share %d of %d)", n, final, member + 1, len(builders))

    try:
        with tokenizer_threads(), no_cyclic_gc():
            plans = together(team.gather, read)
            together(team.gather, tokenise)
        together(team.gather, lambda: build and build.finish(fingerprint, what))
    except BaseException:
        if build is not None:
            build.abort()
        raise
    finally:
        if lock.is_locked:
            lock.release()
    return open_store(final)


def _look(cache: Path, specs: list[str], hard_negatives, tokenizer, max_seq_length: int, prompts
          ) -> tuple[str, dict, bool]:
    """(fingerprint, what it was made of, whether its store in `cache` is complete); the cache dir is created."""
    if not specs:
        raise DataError("no training data given")
    fingerprint, what = store_fingerprint(specs, hard_negatives, tokenizer, max_seq_length, prompts)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create the token cache dir {cache} ({err.strerror}); "
                        f"pass a writable --cache-dir") from None
    return fingerprint, what, check_store(cache / f"store-{fingerprint}", fingerprint) is None
