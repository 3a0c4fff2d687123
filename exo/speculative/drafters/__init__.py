"""Drafters: what proposes the tokens the target verifies.

Schedulers, the speculative engine and the verifiers depend only on `Proposer` and
`DraftBlock` (`base`); each drafter is one module here, named in the `registry`, which
`make_proposer` builds from for one request. This face imports no drafter module, so
config.py can read the drafter names through it.
"""

from exo.speculative.drafters.base import DraftBlock, OneRequest, Proposer
from exo.speculative.drafters.head import draft_head_rows
from exo.speculative.drafters.registry import (
    AUTO,
    DrafterKind,
    Lazy,
    drafter_kind,
    drafter_names,
    make_proposer,
    register,
    resolve,
    unregister,
)

__all__ = [
    "AUTO", "DraftBlock", "DrafterKind", "Lazy", "OneRequest", "Proposer", "draft_head_rows", "drafter_kind",
    "drafter_names", "make_proposer", "register", "resolve", "unregister",
]
