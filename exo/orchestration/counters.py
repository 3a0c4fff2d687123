"""A node's running totals for operations (what /metrics exposes): plain numbers, only added to.

Kept apart from the speculative engine's per-request metrics so that requests which never
reach an engine (refused, failed early, served by a peer) are counted too.
"""

from __future__ import annotations

from collections import Counter

# How a request that was admitted ended.
COMPLETED = "completed"  # generated to its end (length, end of sequence)
STOPPED = "stopped"  # its consumer stopped reading (a stop string, a client gone mid-stream)
CANCELLED = "cancelled"  # cancelled while generating
FAILED = "failed"  # an error ended it
REJECTED = "rejected"  # never admitted (see `rejected` for why)


class NodeCounters:
    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()  # status -> requests
        self.rejected: Counter[str] = Counter()  # reason -> requests refused
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.drafted: Counter[str] = Counter()  # drafter -> tokens proposed
        self.accepted: Counter[str] = Counter()  # drafter -> tokens the target accepted
        self.ring_passes = 0
        self.ring_wall_seconds = 0.0
        self.ring_compute_seconds: Counter[int] = Counter()  # stage index -> seconds

    def reject(self, reason: str) -> None:
        self.rejected[reason] += 1
        self.requests[REJECTED] += 1

    def finish(self, status: str) -> None:
        self.requests[status] += 1

    def unsent(self, tokens: int) -> None:
        """Tokens of a verified block its consumer did not take: cut by a stop string.

        The node counts a block's tokens as generated when it relays the block; those after
        the stop were never produced for anyone, so they come off again."""
        self.generated_tokens -= tokens

    def speculation(self, drafter: str, drafted: int, accepted: int) -> None:
        self.drafted[drafter] += drafted
        self.accepted[drafter] += accepted

    def ring(self, passes: int, wall_seconds: float, compute_seconds: list[float]) -> None:
        self.ring_passes += passes
        self.ring_wall_seconds += wall_seconds
        for stage, seconds in enumerate(compute_seconds):
            self.ring_compute_seconds[stage] += seconds
