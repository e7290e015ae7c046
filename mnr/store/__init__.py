"""Token store: the token ids of every distinct training text in flat arrays on disk, memory-mapped.

  format.py  the files of a store and their checks, its fingerprint, opening it (`TokenStore`, `open_store`)
  build.py   reading the sources, interning and tokenising the texts, writing the files (`Build`)
  team.py    the build split over the processes of a launch (`Team`, the lock, the shares): `prepare_train_store`

Free of torch: the processes of a launch meet through an injected gather (`Team.gather`, see mnr/collective.py).
"""

from mnr.store.build import TOKENISE_CHUNK, Build, assemble, python_only, tokenise_share
from mnr.store.format import (FILES, STORE_VERSION, Prompts, TokenStore, TokenTexts, check_store, open_store,
                              per_source, source_identity, store_fingerprint)
from mnr.store.team import Team, prepare_train_store

__all__ = ["FILES", "STORE_VERSION", "TOKENISE_CHUNK", "Build", "Prompts", "Team", "TokenStore", "TokenTexts",
           "assemble", "check_store", "open_store", "per_source", "prepare_train_store",
           "python_only", "source_identity", "store_fingerprint", "tokenise_share"]
