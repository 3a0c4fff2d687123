"""Choose the draft length K for the next block from what speculation has been earning.

Expected tokens per block with conditional per-position acceptance a_1..a_K is
tau(K) = 1 + sum_i prod_{j<=i} a_j; its cost is K draft steps plus one (K+1)-token target
pass. We pick the K with the best tau / cost, and K = 0 (plain decoding) when nothing beats
it, with a short probe every so often so the estimates can recover when the text changes.
The same holds one position deeper than the chosen K: the estimate of a position that is
never drafted is never corrected, so every `probe_every` blocks one block drafts one more.

Costs are per component and measured the same way every block: one draft *step* (a
forward of the draft over the few tokens it has not seen, never the prompt: that is the
prefill's) and one target pass by input length. Each is a windowed median, so one outlier
(a first call compiling kernels, a page fault, another process) cannot move the choice.

When drafting overlaps verification (the pipelined scheduler) a block's cost is not the
sum of its parts: on separate devices it approaches the larger one, on one shared CPU the
parts slow each other down and the sum of their (inflated) durations counts the shared
time twice. The scheduler then also reports each block's *cycle*, the wall time between
consecutive verdicts, and the ratio cycle / (draft + verify), measured per block, scales
every speculative cost. It is whatever the hardware gives: about max/sum with real
overlap, about 1/2 when two threads share the cores, 1 without overlap.

When the engine batches requests (exo/inference/batching.py) a verify is one row of a pass
over every waiting request's rows. Target costs are therefore kept by the pass's total input
positions, and a block of L = K + 1 tokens is charged its share of a pass over the other
rows' positions (their windowed median, as this request's last passes saw them) plus its
own: pass(others + L) * L / (others + L). What batching is for is the batch's throughput,
and a row that adds positions slows every row of the pass, not just its own. Alone the share
is the whole pass, as before. Where a pass is bound by reading the weights, the price per
position falls as the batch grows and K stays; where it is bound by compute (a large batch
on a CPU), it stops falling and tokens per position decide, so K shrinks towards plain steps.
"""

from __future__ import annotations

import statistics
from collections import deque

# Before measurements exist: acceptance guess, and verify cost growth per extra token
# relative to a one-token target step (measured ~0.1 on CPU, less on GPUs).
PRIOR_ACCEPTANCE = 0.7
PRIOR_VERIFY_SLOPE = 0.1
# An unmeasured draft's size relative to the target, for pricing its passes (draft pairs are
# 3-10x apart in parameters: 0.5B/1.5B, 1B/8B).
PRIOR_DRAFT_SIZE = 0.3


class WindowedMedian:
    """The median of the last `window` samples: follows a real change within half a window,
    ignores any single outlier (an EMA would carry it for many blocks)."""

    def __init__(self, window: int = 9, value: float | None = None):
        self.samples: deque[float] = deque(maxlen=window)
        if value is not None:
            self.samples.append(value)

    def update(self, sample: float) -> float:
        self.samples.append(sample)
        return self.value

    @property
    def value(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    def copy(self) -> "WindowedMedian":
        twin = WindowedMedian(self.samples.maxlen or 1)
        twin.samples.extend(self.samples)
        return twin


class DecayedRate:
    """Acceptance rate as a forgetting Beta estimate: starts at the prior with the weight of
    `prior_weight` observations, so one early rejection cannot shut a position off for good."""

    def __init__(self, prior: float = PRIOR_ACCEPTANCE, prior_weight: float = 2.0, decay: float = 0.9):
        self.prior_weight, self.decay = prior_weight, decay
        self.reset(prior)

    def reset(self, prior: float) -> None:
        self.hits, self.misses = prior * self.prior_weight, (1 - prior) * self.prior_weight
        self.observed = False

    def update(self, accepted: bool) -> None:
        self.hits = self.hits * self.decay + accepted
        self.misses = self.misses * self.decay + (not accepted)
        self.observed = True

    @property
    def value(self) -> float:
        return self.hits / (self.hits + self.misses)


class AdaptiveK:
    def __init__(self, max_depth: int, initial_k: int, adaptive: bool = True, probe_every: int = 20,
                 window: int = 9, warmup_steps: int = 3):
        self.max_depth, self.initial_k, self.adaptive = max_depth, initial_k, adaptive
        self.probe_every, self.warmup_steps = probe_every, warmup_steps
        self.acceptance = [DecayedRate() for _ in range(max_depth)]
        self.window = window
        self.draft_step = WindowedMedian(window)  # seconds per draft forward step
        self.verify: dict[int, WindowedMedian] = {}  # pass positions (all rows) -> target seconds
        self.others = WindowedMedian(window)  # positions of the other rows in this request's passes
        # Lengths seen once: the first pass at a new length allocates (and on some backends
        # compiles), and a K that looks dear is never chosen again to correct it, so that
        # first sample is not kept (measured: one slow warm-up verify held K at 1 for good).
        self._first_seen: set[int] = set()
        self.overlap = WindowedMedian(window)  # block cycle / (draft + verify), when overlapped
        self.prompt_pass = WindowedMedian(window)  # target seconds per token of a prompt pass
        self.catch_up = WindowedMedian(window)  # draft seconds per token of a catch-up pass
        self.steps = 0
        self.since_speculation = 0
        self._deeper_probe_at = 0  # the step of the last block drafted one deeper than the best K

    def observe(self, k: int, accepted: int, draft_s: float, verify_s: float,
                draft_steps: int | None = None, cycle_s: float | None = None,
                pass_positions: int | None = None) -> None:
        """Learn from one verified block: `draft_s` covers `draft_steps` draft forwards
        (default `k`; one more when the confidence cut drafted a token it then dropped);
        `cycle_s`, from a scheduler that overlaps the two, is the block's wall time;
        `pass_positions`, the input positions of the whole pass it was verified in (None: its own)."""
        self.steps += 1
        for i in range(min(k, accepted + 1)):
            if not self.acceptance[i].observed:
                # A first look at a deeper position starts from its neighbour's estimate,
                # so exploring deeper never makes the estimate look worse than it was.
                self.acceptance[i].reset(self.acceptance_at(i))
            self.acceptance[i].update(i < accepted)
        steps = k if draft_steps is None else draft_steps
        if k:
            self.since_speculation = 0
        else:
            self.since_speculation += 1
        if steps:
            self.draft_step.update(draft_s / steps)
        self._observe_length(k + 1, verify_s, pass_positions)
        if k and cycle_s is not None and draft_s + verify_s > 0:
            self.overlap.update(cycle_s / (draft_s + verify_s))

    def observe_verify(self, length: int, verify_s: float, pass_positions: int | None = None) -> None:
        """Learn from a block another drafter proposed: only the target's cost per input
        length carries over; the model's acceptance and step cost are not in it."""
        self.steps += 1
        self._observe_length(length, verify_s, pass_positions)

    def _observe_length(self, length: int, verify_s: float, pass_positions: int | None = None) -> None:
        total = max(pass_positions or length, length)
        self.others.update(total - length)
        if total not in self._first_seen:
            self._first_seen.add(total)
            return
        self.verify.setdefault(total, WindowedMedian(self.window)).update(verify_s)

    def expect_others(self, positions: int) -> None:
        """Before its first block a request knows only who else is decoding on the engine: each
        of them adds at least one position to the passes it will share. Without this prior a
        request joining a full batch prices its first blocks as if alone, drafts (and the
        hybrid catches the draft up on the whole prompt) where plain steps pay more."""
        if positions > 0 and not self.others.samples:
            self.others = WindowedMedian(self.window, float(positions))

    def observe_prompt_pass(self, tokens: int, seconds: float) -> None:
        if tokens > 0:
            self.prompt_pass.update(seconds / tokens)

    def observe_catch_up(self, tokens: int, seconds: float) -> None:
        if tokens > 0:
            self.catch_up.update(seconds / tokens)

    def catch_up_cost(self, tokens: int) -> float | None:
        """Seconds for the draft to take in `tokens` it has not seen in one pass: measured per
        token, else the target's prompt pass scaled by PRIOR_DRAFT_SIZE (None: neither known)."""
        per_token = self.catch_up.value
        if per_token is None and self.prompt_pass.value is not None:
            per_token = self.prompt_pass.value * PRIOR_DRAFT_SIZE
        return None if per_token is None else per_token * tokens

    def acceptance_at(self, i: int) -> float:
        """Position i's estimate; a never-tried position borrows the deepest tried one's."""
        for rate in reversed(self.acceptance[: i + 1]):
            if rate.observed:
                return rate.value
        return PRIOR_ACCEPTANCE

    def verify_cost(self, length: int) -> float | None:
        """Target seconds charged to a block of `length` tokens: its share, by positions, of a
        pass beside the other rows (the whole pass when alone)."""
        total = length + round(self.others.value or 0.0)
        cost = self.pass_cost(total)
        return None if cost is None else cost * length / total

    def pass_cost(self, length: int) -> float | None:
        """Target seconds for a pass over `length` positions: measured, else interpolated, else
        extrapolated."""
        known = sorted((n, m.value) for n, m in self.verify.items() if m.value is not None)
        if not known:
            return None
        for n, value in known:
            if n == length:
                return value
        below = [(n, v) for n, v in known if n < length]
        above = [(n, v) for n, v in known if n > length]
        if below and above:
            (n0, v0), (n1, v1) = below[-1], above[0]
            return v0 + (v1 - v0) * (length - n0) / (n1 - n0)
        if len(known) >= 2:
            (n0, v0), (n1, v1) = known[0], known[-1]
            slope = max((v1 - v0) / (n1 - n0), 0.0)
        else:
            (n0, v0), slope = known[0], known[0][1] * PRIOR_VERIFY_SLOPE / (1 + PRIOR_VERIFY_SLOPE * (known[0][0] - 1))
        return max(v0 + slope * (length - n0), 1e-6)

    def trusted_depth(self, threshold: float) -> int:
        """Leading positions whose acceptance estimate is at least `threshold`: there a low
        draft confidence is no reason to stop drafting. A position not yet tried borrows its
        neighbour's estimate (as in `acceptance_at`): the confidence cut itself keeps deeper
        positions from being tried, so trusting only measured ones would seal the cut in
        (measured on code: 97 % acceptance at position 0, yet every block cut to one token)."""
        depth = 0
        while depth < self.max_depth and self.acceptance_at(depth) >= threshold:
            depth += 1
        return depth

    def plain_step_time(self) -> float | None:
        return self.verify_cost(1)

    def expected_rate(self, k: int) -> float | None:
        """Tokens per second expected from blocks of `k` drafts (None until costs are known)."""
        verify = self.verify_cost(k + 1)
        if verify is None or (k and self.draft_step.value is None):
            return None
        tau, survive = 1.0, 1.0
        for i in range(k):
            survive *= self.acceptance_at(i)
            tau += survive
        cost = k * (self.draft_step.value or 0.0) + verify
        if k and self.overlap.value is not None:
            cost *= self.overlap.value
        return tau / cost

    def inherit_costs(self, previous: "AdaptiveK") -> None:
        """Start from another request's measured costs (they belong to the hardware and the
        models, not to the text), so a new request needs no warm-up blocks at a fixed K.
        The caller hands over only a controller measured the same way (same scheduler, same
        pair, same placement); prompt passes are in neither, so prompt length cannot leak in."""
        if previous.draft_step.value is not None and previous.verify:
            self.draft_step = previous.draft_step.copy()
            self.verify = {n: m.copy() for n, m in previous.verify.items()}
            self._first_seen = set(previous._first_seen)
            self.overlap = previous.overlap.copy()
            self.warmup_steps = 0
        # What the pair's acceptance was becomes this request's prior, with the weight of two
        # observations: the text decides within a few blocks, but a request no longer starts
        # from a generic guess (at 0.7 a good draft is priced at K = 1, and K = 1 never tries
        # the deeper positions that would show otherwise).
        for mine, theirs in zip(self.acceptance, previous.acceptance):
            if theirs.observed:
                mine.reset(theirs.value)
                mine.observed = True
        for name in ("prompt_pass", "catch_up"):
            if getattr(previous, name).value is not None:
                setattr(self, name, getattr(previous, name).copy())

    @property
    def _choosing(self) -> bool:
        """Whether K is chosen from measurements yet (else the configured K holds)."""
        return self.adaptive and self.steps >= self.warmup_steps

    def best_k(self) -> int:
        """The K with the best expected rate now (no probes; the configured K until measured)."""
        if not self._choosing:
            return self.initial_k
        rates = {k: self.expected_rate(k) for k in range(self.max_depth + 1)}
        rates = {k: r for k, r in rates.items() if r is not None}
        if not rates:
            return self.initial_k
        return max(rates, key=lambda k: (rates[k], -k))

    def choose(self) -> int:
        """The next block's K: the best, or now and then a probe that keeps estimates honest."""
        best = self.best_k()
        if not self._choosing:
            return best
        if best == 0 and self.since_speculation >= self.probe_every:
            return 1  # cheap probe: is the draft any good again?
        if 0 < best < self.max_depth and self.steps - self._deeper_probe_at >= self.probe_every:
            # One draft step more, once per probe_every blocks (~2 % of draft time): an early
            # miss at position best+1 otherwise holds K at best for the rest of the request.
            self._deeper_probe_at = self.steps
            return best + 1
        return best
