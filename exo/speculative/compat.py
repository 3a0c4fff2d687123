"""Can this draft's tokens be verified by this target? Same ids must mean the same text."""

from __future__ import annotations

from exo.inference.tokenizer import Tokenizer
from exo.speculative.config import ConfigError


def check_tokenizers(target: Tokenizer, draft: Tokenizer, target_name: str, draft_name: str) -> None:
    """Raise unless both vocabularies agree on every id they share (padding may differ)."""
    target_vocab = {i: t for t, i in target.get_vocab().items()}
    draft_vocab = {i: t for t, i in draft.get_vocab().items()}
    shared = min(len(target_vocab), len(draft_vocab))
    mismatched = [i for i in range(shared) if target_vocab.get(i) != draft_vocab.get(i)]
    if mismatched:
        i = mismatched[0]
        raise ConfigError(
            f"draft {draft_name} and target {target_name} have different tokenizers "
            f"({len(mismatched)} of {shared} shared ids differ; id {i} is {draft_vocab.get(i)!r} "
            f"in the draft but {target_vocab.get(i)!r} in the target)"
        )
    if target.eos_token_ids and draft.eos_token_ids and not (target.eos_token_ids & draft.eos_token_ids):
        raise ConfigError(f"draft {draft_name} and target {target_name} disagree on end-of-sequence ids")
