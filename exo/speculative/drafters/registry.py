"""The drafters by name: whether each needs a draft model, what runs instead when that model
is unavailable, and how to build one for a request.

The config's check of `drafter`, the engine's choice of whether to load a draft model and
which drafter to run, and `make_proposer` all read this one table, so a new drafter is its
module plus one `register` line at the end of this file.

config.py imports this module, and a drafter module may well import config.py, so this one
imports no drafter module: a built-in kind names its builder by module (`Lazy`), imported
the first time a proposer of that kind is built.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from exo.inference.engine import InferenceEngine
    from exo.inference.shard import Shard
    from exo.speculative.adaptive import AdaptiveK
    from exo.speculative.config import SpeculativeConfig
    from exo.speculative.drafters.base import Proposer

    # (config, draft engine, draft shard, the request's adaptive K) -> that request's proposer.
    # Engine and shard are None only for a kind that needs no model.
    Builder = Callable[[SpeculativeConfig, InferenceEngine | None, Shard | None, AdaptiveK], Proposer]

AUTO = "auto"  # not a kind: `resolve` turns it into one
AUTO_PICKS = "hybrid"  # what "auto" runs (and, without a draft model, what that kind gives way to)


@dataclass(frozen=True)
class DrafterKind:
    """A drafter a config may name."""

    name: str
    needs_model: bool  # whether it drafts with a draft model (the engine loads one for it)
    build: Builder
    # What runs instead when the draft model is unavailable: a kind that needs none, or None
    # for plain decoding. Only a kind that needs a model has one.
    without_model: str | None = None


@dataclass(frozen=True)
class Lazy:
    """A builder named by module and function, imported at its first build, so that reading
    the table (config.py does) loads no drafter module."""

    module: str
    function: str

    def __call__(self, config: SpeculativeConfig, engine: InferenceEngine | None, shard: Shard | None,
                 controller: AdaptiveK) -> Proposer:
        builder = getattr(importlib.import_module(self.module), self.function)
        return builder(config, engine, shard, controller)


_KINDS: dict[str, DrafterKind] = {}


def register(kind: DrafterKind) -> None:
    """Make `kind` a drafter configs may name (a name is taken once)."""
    if kind.name == AUTO or kind.name in _KINDS:
        raise ValueError(f"drafter name {kind.name!r} is taken")
    if kind.without_model is not None:
        fallback = _KINDS.get(kind.without_model)
        if not kind.needs_model or fallback is None or fallback.needs_model:
            raise ValueError(f"drafter {kind.name!r}: without_model must name a registered drafter that needs "
                             f"no model, on a drafter that needs one (got {kind.without_model!r})")
    _KINDS[kind.name] = kind


def unregister(name: str) -> None:
    """Forget the drafter `name`: configs naming it are refused from then on."""
    drafter_kind(name)
    dependents = [kind.name for kind in _KINDS.values() if kind.without_model == name]
    if dependents:
        raise ValueError(f"drafter {name!r} is what {', '.join(dependents)} run(s) without a model")
    del _KINDS[name]


def drafter_kind(name: str) -> DrafterKind:
    """The registered drafter `name` ("auto" names none until `resolve` picks one)."""
    kind = _KINDS.get(name)
    if kind is None:
        raise ValueError(f"{name!r} is not a drafter kind (registered: {', '.join(_KINDS)}; "
                         f"{AUTO!r} is resolved first)")
    return kind


def drafter_names() -> tuple[str, ...]:
    """Every name a config may give: "auto", then the kinds in registration order."""
    return (AUTO, *_KINDS)


def resolve(name: str, have_model: bool) -> str | None:
    """The drafter to run for the configured `name`: "auto" runs AUTO_PICKS, and a kind that
    needs a model gives way, when none is available, to its `without_model` (None: plain
    decoding)."""
    kind = drafter_kind(AUTO_PICKS if name == AUTO else name)
    return kind.name if have_model or not kind.needs_model else kind.without_model


def make_proposer(config: SpeculativeConfig, engine: InferenceEngine | None, shard: Shard | None,
                  controller: AdaptiveK) -> Proposer:
    """A proposer for one request: the kind `config.drafter` names ("auto" already resolved),
    drafting with the draft `engine` holding `shard` where it needs a model; `controller` is
    the request's adaptive K."""
    kind = drafter_kind(config.drafter)
    if kind.needs_model and (engine is None or shard is None):
        raise ValueError(f"the {kind.name!r} drafter needs a draft model")
    return kind.build(config, engine, shard, controller)


# The built-in drafters: a small model; copies of repeats in the request's own text (under the
# hybrid's policy of when they pay); the better of the two per block.
register(DrafterKind("model", needs_model=True, build=Lazy("exo.speculative.drafters.model", "build_model")))
register(DrafterKind("suffix", needs_model=False, build=Lazy("exo.speculative.drafters.hybrid", "build_suffix")))
register(DrafterKind("hybrid", needs_model=True, build=Lazy("exo.speculative.drafters.hybrid", "build_hybrid"),
                     without_model="suffix"))
