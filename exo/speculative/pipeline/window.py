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

MIN_SURVIVAL = 0.3  # see bench/ring_window_sim.py: the sweep that chose it
PRIOR_FULL_RATE = 0.5  # whole-block acceptance assumed before the first verdict
RATE_WEIGHT = 0.2  # weight of the newest verdict in the moving average


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
        if not self.adaptive:
            return self.cap
        n = 1
        while n < self.cap and self.full_rate ** n >= MIN_SURVIVAL:
            n += 1
        return n

    def has_room(self) -> bool:
        return self.in_flight < self.allowed()

    def sent(self, tokens: list[int]) -> None:
        self.sequence += tokens
        self.in_flight += 1

    def judged(self, k: int, diverged: bool, committed: list[int]) -> None:
        """One verdict is back; a divergence ends the epoch and every bet in flight."""
        self.in_flight -= 1
        if k:
            self.full_rate += RATE_WEIGHT * ((not diverged) - self.full_rate)
        if diverged:
            self.epoch += 1
            self.sequence = list(committed)
            self.in_flight = 0
        self.changed.set()
        self.changed = anyio.Event()
