"""The restricted output head a config asks the draft model for (`draft_vocab`).

Its own module, not the model drafter's: the package face re-exports it, and the face must
stay free of the drafter modules (see `registry`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from exo.inference.head_rows import HeadRows

if TYPE_CHECKING:
    from exo.inference.engine import InferenceEngine
    from exo.speculative.config import SpeculativeConfig


def draft_head_rows(config: SpeculativeConfig, engine: InferenceEngine) -> HeadRows | None:
    """The restricted output head `config.draft_vocab` asks for on the loaded draft, or None."""
    if not config.draft_vocab or engine.tokenizer is None:
        return None
    tokenizer = engine.tokenizer
    # Added tokens (end of turn, tool and FIM markers) sit past the merges: always keep them.
    added = list(tokenizer.hf.added_tokens_decoder)
    return HeadRows.ranked(config.draft_vocab, len(tokenizer), [*tokenizer.eos_token_ids, *added])
