"""How many blocks a pipelined verifier keeps in flight, and what it assumes about them.

A block sent before the verdict of the blocks ahead of it is a bet that they are accepted
entirely (bonus deferred); it pays only then. In a ring of P stages up to P blocks compute at
once, so blocks beyond the first keep otherwise idle stages busy, and a lost bet costs little
(stages drop it, or discard it while the ring would have idled). With `ring_window` 0 (auto)
the window is at most the ring's stages and shrinks while whole blocks are seldom accepted:
the n-th block is sent only while the measured rate f of whole-block acceptance gives it
f ** (n - 1) >= MIN_SURVIVAL of being used. A fixed `ring_window` W keeps W always.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio

MIN_SURVIVAL = 0.1  # chosen by the sweep in bench/ring_sim_check.py (see the README)
PRIOR_FULL_RATE = 0.5  # whole-block acceptance assumed before the first verdict
RATE_WEIGHT = 0.2  # weight of the newest verdict in the moving average


def allowed_window(cap: int, full_rate: float, min_survival: float = MIN_SURVIVAL) -> int:
    """Blocks in flight while whole blocks are accepted at `full_rate`: the n-th only while
    full_rate ** (n - 1) >= min_survival (always the first)."""
    n = 1
    while n < cap and full_rate ** n >= min_survival:
        n += 1
    return n


def next_full_rate(rate: float, k: int, diverged: bool) -> float:
    """The moving average after a verdict (plain steps say nothing about drafts)."""
    return rate + RATE_WEIGHT * ((not diverged) - rate) if k else rate


def window_cap(ring_window: int, stages: int) -> int:
    """The most blocks in flight: the fixed window, or (auto) one per stage."""
    return ring_window if ring_window > 0 else max(1, stages)


@dataclass
class Window:
    cap: int
    adaptive: bool
    sequence: list[int]  # committed tokens plus those of every block in flight
    epoch: int = 0  # verdicts that diverged so far
    in_flight: int = 0
    full_rate: float = PRIOR_FULL_RATE
    changed: anyio.Event = field(default_factory=anyio.Event)

    def allowed(self) -> int:
        return allowed_window(self.cap, self.full_rate) if self.adaptive else self.cap

    def has_room(self) -> bool:
        return self.in_flight < self.allowed()

    def sent(self, tokens: list[int]) -> None:
        self.sequence += tokens
        self.in_flight += 1

    def judged(self, k: int, diverged: bool, committed: list[int]) -> None:
        """One verdict is back; a divergence ends the epoch and every bet in flight."""
        self.in_flight -= 1
        self.full_rate = next_full_rate(self.full_rate, k, diverged)
        if diverged:
            self.epoch += 1
            self.sequence = list(committed)
            self.in_flight = 0
        self.changed.set()
        self.changed = anyio.Event()
