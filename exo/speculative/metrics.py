"""Counters and timings of speculative decoding, per request and per engine."""

from __future__ import annotations

import msgspec


class DrafterSnapshot(msgspec.Struct, frozen=True):
    """One drafter's share of a request or an engine ("none": blocks verified without a draft)."""

    blocks: int
    drafted_tokens: int
    accepted_tokens: int
    emitted_tokens: int
    acceptance_rate: float
    tokens_per_verify: float  # emitted per block of this drafter, the verify's own token included
    draft_time: float
    verification_time: float


class _DrafterCounts:
    __slots__ = ("blocks", "drafted", "accepted", "emitted", "draft_time", "verification_time")

    def __init__(self) -> None:
        self.blocks = self.drafted = self.accepted = self.emitted = 0
        self.draft_time = self.verification_time = 0.0

    def record(self, k: int, accepted: int, emitted: int, draft_s: float, verify_s: float) -> None:
        self.blocks += 1
        self.drafted += k
        self.accepted += accepted
        self.emitted += emitted
        self.draft_time += draft_s
        self.verification_time += verify_s

    def add(self, other: "_DrafterCounts") -> None:
        for name in self.__slots__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def snapshot(self) -> DrafterSnapshot:
        return DrafterSnapshot(self.blocks, self.drafted, self.accepted, self.emitted,
                               self.accepted / self.drafted if self.drafted else 0.0,
                               self.emitted / self.blocks if self.blocks else 0.0, self.draft_time,
                               self.verification_time)


class MetricsSnapshot(msgspec.Struct, frozen=True):
    """What `get_metrics()` returns and metric events carry."""

    steps: int
    drafted_tokens: int  # draft positions that reached the output's span (see record_step)
    accepted_tokens: int  # accepted drafts that were emitted
    emitted_tokens: int  # every token of the completion, the prefill's first one included
    acceptance_rate: float  # accepted / drafted
    mean_accepted_length: float  # tokens emitted per verification (bonus included, prefill's not)
    per_position_acceptance: list[float]  # P(accept position i | positions < i accepted)
    draft_time: float  # seconds spent drafting
    verification_time: float  # seconds spent in target forwards
    tokens_per_second: float
    estimated_speedup: float  # tokens/s over the estimated plain-decoding rate (0 if unknown)
    k_histogram: dict[int, int]  # how often each block size was verified
    draft_failures: int
    fallback_steps: int  # steps decoded without a draft after a failure
    pipeline_busy: dict[str, float] = {}  # pipelined: seconds the draft / verify side computed
    pipeline_idle: dict[str, float] = {}  # pipelined: seconds the draft / verify side waited
    prefill_time: float = 0.0  # seconds of the prompt pass(es) up to the first token
    draft_prefill_time: float = 0.0  # seconds of the draft's prompt pass (never in draft_time)
    per_drafter: dict[str, DrafterSnapshot] = {}  # the same counts split by who drafted each block


class SpeculativeMetrics:
    def __init__(self) -> None:
        self.steps = self.drafted = self.accepted = self.emitted = 0
        self.draft_time = self.verification_time = self.decode_time = 0.0
        self.position_tries: list[int] = []
        self.position_accepts: list[int] = []
        self.k_histogram: dict[int, int] = {}
        self.draft_failures = self.fallback_steps = 0
        self.prefill_time = self.draft_prefill_time = 0.0
        self.prefill_emitted = 0  # the first token, sampled from the prompt pass
        self.pipeline_busy: dict[str, float] = {}  # pipelined: seconds each side computed
        self.pipeline_idle: dict[str, float] = {}  # pipelined: seconds each side waited
        self.per_drafter: dict[str, _DrafterCounts] = {}

    def record_step(self, k: int, accepted: int, emitted: int, draft_s: float, verify_s: float,
                    drafter: str = "model") -> None:
        """Count one verification by what it put in the output. When the end of the output
        (EOS or the token budget) cuts a block after `emitted` tokens, the caller passes the
        block as seen up to there: k and accepted at most `emitted`."""
        self.steps += 1
        self.drafted += k
        self.accepted += accepted
        self.emitted += emitted
        self.draft_time += draft_s
        self.verification_time += verify_s
        self.decode_time += draft_s + verify_s
        self.k_histogram[k] = self.k_histogram.get(k, 0) + 1
        self.per_drafter.setdefault(drafter, _DrafterCounts()).record(k, accepted, emitted, draft_s, verify_s)
        while len(self.position_tries) < k:
            self.position_tries.append(0)
            self.position_accepts.append(0)
        for i in range(min(k, accepted + 1)):
            self.position_tries[i] += 1
            self.position_accepts[i] += i < accepted

    def merge(self, other: "SpeculativeMetrics") -> None:
        for name in ("steps", "drafted", "accepted", "emitted", "draft_time", "verification_time",
                     "decode_time", "draft_failures", "fallback_steps", "prefill_time", "draft_prefill_time",
                     "prefill_emitted"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("pipeline_busy", "pipeline_idle"):
            mine = getattr(self, name)
            for side, seconds in getattr(other, name).items():
                mine[side] = mine.get(side, 0.0) + seconds
        for k, n in other.k_histogram.items():
            self.k_histogram[k] = self.k_histogram.get(k, 0) + n
        for drafter, counts in other.per_drafter.items():
            self.per_drafter.setdefault(drafter, _DrafterCounts()).add(counts)
        for i, (tries, accepts) in enumerate(zip(other.position_tries, other.position_accepts)):
            if i >= len(self.position_tries):
                self.position_tries.append(0)
                self.position_accepts.append(0)
            self.position_tries[i] += tries
            self.position_accepts[i] += accepts

    def snapshot(self, plain_step_time: float | None = None) -> MetricsSnapshot:
        rate = self.emitted / self.decode_time if self.decode_time > 0 else 0.0
        speedup = rate * plain_step_time if plain_step_time else 0.0
        return MetricsSnapshot(
            steps=self.steps, drafted_tokens=self.drafted, accepted_tokens=self.accepted,
            emitted_tokens=self.emitted + self.prefill_emitted,
            acceptance_rate=self.accepted / self.drafted if self.drafted else 0.0,
            mean_accepted_length=self.emitted / self.steps if self.steps else 0.0,
            per_position_acceptance=[a / t if t else 0.0 for a, t in zip(self.position_accepts, self.position_tries)],
            draft_time=self.draft_time, verification_time=self.verification_time,
            tokens_per_second=rate, estimated_speedup=speedup, k_histogram=dict(self.k_histogram),
            draft_failures=self.draft_failures, fallback_steps=self.fallback_steps,
            pipeline_busy=dict(self.pipeline_busy), pipeline_idle=dict(self.pipeline_idle),
            prefill_time=self.prefill_time, draft_prefill_time=self.draft_prefill_time,
            per_drafter={name: counts.snapshot() for name, counts in sorted(self.per_drafter.items())},
        )
