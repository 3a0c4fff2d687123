"""A suffix-automaton drafter: propose what followed the longest earlier repeat of the text's end.

Model-free and deterministic: for its one request, a `SuffixAutomaton` indexes the prompt and
then the committed tokens; a block is the tokens that followed the earlier occurrence of
the longest suffix of the sequence that occurred before, as many as the match length
earns (`length_rule`), capped by `max_depth` and the caller's `k`. It costs microseconds
per block and pays where the output repeats its context: code edits, quoting, lists,
structured output, a model stuck in a loop.

Only tokens known to be committed are indexed: the prompt at prefill, then up to the
largest length passed to `accept`, lazily in the next `propose` (`accept` has the length,
`propose` has the tokens). The rest of `committed` (tokens emitted but not yet confirmed
by `accept`, and in a pipelined run the blocks still in flight) is a speculative tail
that a copy of the match cursor runs over. That copy is kept between calls and resumed
while the indexed text is unchanged, so a long run of accepted pipelined blocks costs per
block only its own new tokens, never the history again.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from exo.inference.generate import GenerationParams
from exo.speculative.config import SpeculativeConfig
from exo.speculative.drafters.base import DraftBlock, OneRequest
from exo.speculative.drafters.suffix_automaton import Cursor, SuffixAutomaton

# The defaults, in one place. Set by `bench/drafters.py`'s replay of the suffix mode's own
# policy over the greedy outputs of 14 prompts in 7 categories (2026-12-02): a minimum match
# of 1 beat 2 and 3 at every factor (geometric mean of the category medians 1.20-1.22x vs
# 1.17-1.19x vs 1.13-1.15x), since the hybrid's learned acceptance per match length already
# shortens or drops the short matches that miss; factors 0.5, 1 and 2 came within 2 %.
DEFAULT_MIN_MATCH = 1  # shortest match worth proposing from
DEFAULT_SPEC_FACTOR = 1.0  # tokens proposed per matched token
DEFAULT_MAX_DEPTH = 32  # the drafter's own cap on a block, before the caller's k
CHECK_WINDOW = 8  # indexed tokens compared against `committed` on every propose
RESYNC_MIN_MATCH = 4  # a copy from a match this long resumes past a one-token substitution


def default_length_rule(match_length: int) -> int:
    """Block length for a match of `match_length` tokens: DEFAULT_SPEC_FACTOR per matched
    token (a longer repeat is likelier to go on), before the caps."""
    return math.ceil(DEFAULT_SPEC_FACTOR * match_length)


class _Request:
    """What the drafter holds for its request between prefill and release."""

    __slots__ = ("automaton", "tokens", "known", "tail_end", "tail_last", "tail_cursor", "last_match",
                 "last_copy", "last_resumed")

    def __init__(self, prompt: list[int]):
        self.automaton = SuffixAutomaton(prompt)
        self.tokens = list(prompt)  # the indexed tokens: committed for sure
        self.known = len(prompt)  # the largest committed length we were told of
        # The tail cursor of the last propose: `committed[len(tokens):tail_end]` run through.
        self.tail_end = -1  # -1: none to resume
        self.tail_last = -1  # committed[tail_end - 1] then, to spot a changed tail
        self.tail_cursor: Cursor | None = None
        self.last_match = 0
        # The last proposal: (committed length it followed, where its source began in the
        # sequence, the match length behind it), or None when there was none.
        self.last_copy: tuple[int, int, int] | None = None
        self.last_resumed = False  # whether that proposal resumed a copy past a substitution


class SuffixDrafter:
    """A `Proposer` drafting from repeats within its request's own sequence. Released, it may
    start over under the same id (a prefill again), never another one."""

    def __init__(self, min_match: int = DEFAULT_MIN_MATCH,
                 length_rule: Callable[[int], int] = default_length_rule,
                 max_depth: int = DEFAULT_MAX_DEPTH, resync: bool = True):
        if min_match < 1:
            raise ValueError(f"min_match must be at least 1, got {min_match}")
        if max_depth < 0:
            raise ValueError(f"max_depth must be non-negative, got {max_depth}")
        self.min_match, self.length_rule, self.max_depth = min_match, length_rule, max_depth
        self.resync = resync
        self._serves = OneRequest("suffix drafter")
        self._held: _Request | None = None  # between prefill and release

    @classmethod
    def from_config(cls, config: SpeculativeConfig) -> SuffixDrafter:
        """The drafter with the config's `suffix_min_match` and `suffix_max_depth`."""
        return cls(min_match=config.suffix_min_match, max_depth=config.suffix_max_depth)

    async def prefill(self, request_id: str, prompt: list[int]) -> None:
        """Index the prompt (O(len(prompt)), once)."""
        self._serves.bind(request_id)
        if self._held is not None:
            raise RuntimeError(f"suffix drafter already holds {request_id!r} before its prefill")
        self._held = _Request(prompt)

    async def propose(self, request_id: str, committed: list[int], k: int, params: GenerationParams,
                      threshold: float, rng: np.random.Generator,
                      interrupted: Callable[[], bool] = lambda: False, trusted: int = 0) -> DraftBlock:
        """Up to `k` tokens after `committed`. `params`, `threshold`, `rng`, `interrupted`
        and `trusted` are ignored: the draft is deterministic and takes microseconds."""
        return self.draft(request_id, committed, k)

    def draft(self, request_id: str, committed: list[int], k: int) -> DraftBlock:
        """`propose` without the coroutine: the block after `committed`, at most `k` tokens."""
        state = self._state(request_id)
        automaton, tokens = state.automaton, state.tokens
        n, indexed = len(committed), len(tokens)
        if n < indexed:
            raise RuntimeError(f"suffix drafter of {request_id!r} indexed {indexed} committed tokens but is asked "
                               f"to draft after {n}: committed tokens were rolled back")
        low = max(0, indexed - CHECK_WINDOW)
        if committed[low:indexed] != tokens[low:indexed]:
            raise RuntimeError(f"suffix drafter of {request_id!r}: the sequence to draft after disagrees with "
                               f"the committed tokens it indexed (within positions {low}..{indexed - 1})")

        stop = min(state.known, n)
        if stop > indexed:  # tokens `accept` confirmed since: index them (each token once, ever)
            new = committed[indexed:stop]
            automaton.extend(new)
            tokens.extend(new)
            indexed = stop
            state.tail_end = -1  # a tail cursor belongs to the automaton it ran on

        end = state.tail_end
        if indexed <= end <= n and (end == 0 or committed[end - 1] == state.tail_last):
            cursor = automaton.follow(committed[end:n], state.tail_cursor)
        else:
            cursor = automaton.follow(committed[indexed:n])
        state.tail_end, state.tail_last, state.tail_cursor = n, (committed[n - 1] if n else -1), cursor

        match, start = cursor.length, cursor.end + 1  # start <= n - 1: the occurrence ends before
        resumed = self._resumed(state, committed) if self.resync else None
        state.last_resumed = resumed is not None and resumed[1] > match
        if state.last_resumed:
            start, match = resumed
        state.last_match = match
        depth = min(k, self.max_depth, self.length_rule(match)) if match >= self.min_match else 0
        state.last_copy = (n, start, match) if depth > 0 else None
        if depth <= 0:
            return DraftBlock([], None, n, steps=0, drafter="suffix")
        if start + depth <= n:
            block = committed[start:start + depth]
        else:
            # The continuation runs into the sequence's own end: copy on through what is
            # being proposed (like an overlapping LZ77 copy), i.e. repeat the period n - start.
            period = committed[start:n]
            block = (period * (depth // len(period) + 1))[:depth]
        return DraftBlock(block, None, n, steps=0, drafter="suffix")

    @staticmethod
    def _resumed(state: _Request, committed: list[int]) -> tuple[int, int] | None:
        """Where the last copy's source goes on if the target replaced exactly one of its
        tokens (the last committed one): a rewrite that re-indents, renames or requotes
        departs from its source one token at a time and then follows it again, while the
        automaton's match, which must include the replaced token, starts over from nothing.
        Returns (source start, match length to draft by): the copy's match plus the tokens
        it got right, or half its match when it missed at once (a chain of misses ends)."""
        if state.last_copy is None:
            return None
        base, start, length = state.last_copy
        gap = len(committed) - base
        if length < RESYNC_MIN_MATCH or gap < 1 or start + gap >= len(committed):
            return None
        if committed[base:base + gap - 1] != committed[start:start + gap - 1]:
            return None  # it missed earlier: that was a different text after all
        if committed[base + gap - 1] == committed[start + gap - 1]:
            return None  # it went on matching: the automaton's match covers it
        return start + gap, (length + gap - 1 if gap > 1 else length // 2)

    def limit(self, chosen_k: int) -> int:
        return self.max_depth  # drafting is free: the match decides, not adaptive K

    def verified(self, request_id: str, block: DraftBlock, accepted: int, committed_length: int) -> None:
        """Tokens up to `committed_length` are final: index them at the next propose."""
        state = self._state(request_id)
        state.known = max(state.known, committed_length)

    def accept(self, request_id: str, committed_length: int) -> None:
        """The first `committed_length` tokens are committed; they get indexed by the next
        propose. A length below what is already indexed is a bug in the caller."""
        state = self._state(request_id)
        if committed_length < len(state.tokens):
            raise RuntimeError(f"suffix drafter of {request_id!r} indexed {len(state.tokens)} committed tokens but "
                               f"is told only {committed_length} are committed")
        state.known = max(state.known, committed_length)
        state.tail_end = -1  # what lay past the committed prefix may have been rejected

    def release(self, request_id: str) -> None:
        self._serves.check(request_id)
        self._held = None

    def last_match(self, request_id: str) -> int:
        """The match length behind the request's last proposal (also when it was below
        `min_match` and nothing was proposed); 0 before any."""
        return self._state(request_id).last_match

    def last_resumed(self, request_id: str) -> bool:
        """Whether the request's last proposal resumed a copy past a replaced token."""
        return self._state(request_id).last_resumed

    def indexed(self, request_id: str) -> int:
        """How many tokens of the request are indexed (all committed)."""
        return len(self._state(request_id).tokens)

    def _state(self, request_id: str) -> _Request:
        if self._held is None:
            raise RuntimeError(f"suffix drafter holds nothing for {request_id!r}: prefill it first")
        self._serves.check(request_id)  # held, so bound by the prefill
        return self._held
