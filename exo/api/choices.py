"""One response, several generations: `n` choices per prompt and completions prompt lists.

Each choice is its own request down to the engine (own id, caches, RNG). Seeded requests
stay reproducible: choice j of a prompt uses a seed derived from the request's seed (choice
0 uses the seed itself, so `n: 1` and the first of `n: 2` agree).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from exo.api.schemas import Usage
from exo.api.unsupported import MAX_CHOICES
from exo.inference.generate import GenerationParams
from exo.inference.logprobs import MAX_TOP_LOGPROBS, TokenLogprob
from exo.inference.text_stream import TextStream

MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for the legacy completions endpoint


class ChoiceError(ValueError):
    """A request parameter about choices or logprobs is out of range."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def requested_choices(body: Any) -> int:
    n = 1 if body.n is None else body.n
    if not 1 <= n <= MAX_CHOICES:
        raise ChoiceError("n", f"n must be in 1..{MAX_CHOICES}, got {n}")
    return n


def requested_logprobs(body: Any, chat: bool) -> int | None:
    """How many alternatives per token the request wants (0: only the chosen token), or None."""
    if chat:
        top = body.top_logprobs
        if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
            raise ChoiceError("top_logprobs", f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {top}")
        if not body.logprobs:
            if top:
                raise ChoiceError("top_logprobs", "top_logprobs requires logprobs: true")
            return None
        return top or 0
    if body.logprobs is None:
        return None
    if not 0 <= body.logprobs <= MAX_COMPLETION_LOGPROBS:
        raise ChoiceError("logprobs", f"logprobs must be in 0..{MAX_COMPLETION_LOGPROBS}, got {body.logprobs}")
    return body.logprobs


def choice_params(params: GenerationParams, j: int, top: int | None) -> GenerationParams:
    """Choice j's parameters: its own seed (derived, so a seeded request stays reproducible)."""
    seed = params.seed
    if seed is not None and j:
        seed = int(np.random.SeedSequence([seed, j]).generate_state(1, np.uint64)[0] >> np.uint64(1))
    return msgspec.structs.replace(params, seed=seed, logprobs=top)


@dataclass
class Choice:
    """One generation of a response and what it produced so far."""

    index: int
    request_id: str
    prompt: list[int]
    params: GenerationParams
    text: TextStream
    count: int = 0  # tokens generated
    pieces: list[str] = field(default_factory=list)
    reported: list[TokenLogprob] = field(default_factory=list)  # entries of tokens that show as text
    offsets: list[int] = field(default_factory=list)  # their character offsets into the text
    decoded: int = 0  # length of the decoded text so far (for offsets)


def summed_usage(prompts: list[list[int]], completion_tokens: int, snapshots: list[Any]) -> Usage:
    """Usage of the whole response: each prompt counted once, every choice's tokens, and the
    speculative counters summed over choices (None when no choice speculated)."""
    prompt_tokens = sum(len(p) for p in prompts)
    extra = None
    if snapshots:
        drafted = sum(s.drafted_tokens for s in snapshots)
        accepted = sum(s.accepted_tokens for s in snapshots)
        extra = {"drafted_tokens": drafted, "accepted_tokens": accepted,
                 "acceptance_rate": snapshots[0].acceptance_rate if len(snapshots) == 1 else
                 (accepted / drafted if drafted else 0.0),
                 "mean_accepted_length": sum(s.mean_accepted_length for s in snapshots) / len(snapshots)}
    return Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens, extra)
