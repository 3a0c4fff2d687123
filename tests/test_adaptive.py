"""Adaptive K: follows acceptance and cost, goes to K=0 when speculation loses, probes back."""

import pytest

from exo.speculative.adaptive import AdaptiveK


def feed(controller, steps, accept_prob_by_pos, draft_cost, verify_cost):
    for _ in range(steps):
        k = controller.choose()
        accepted = 0
        while accepted < k and accept_prob_by_pos(accepted) >= 0.5:
            accepted += 1
        controller.observe(k, accepted, k * draft_cost, verify_cost(k + 1))
    return controller.best_k()


def test_good_draft_cheap_draft_goes_deep():
    c = AdaptiveK(max_depth=8, initial_k=4)
    k = feed(c, 30, lambda i: 1.0, draft_cost=0.05, verify_cost=lambda n: 1 + 0.1 * (n - 1))
    assert k == 8


def test_useless_draft_goes_to_zero_then_probes():
    c = AdaptiveK(max_depth=8, initial_k=4, probe_every=5)
    ks = []
    for _ in range(40):
        k = c.choose()
        ks.append(k)
        c.observe(k, 0, 0.35 * k, 1 + 0.1 * k)
    assert ks[-20:].count(0) >= 15
    assert 1 in ks[-20:]  # occasional probes


def test_fixed_when_not_adaptive():
    c = AdaptiveK(max_depth=8, initial_k=3, adaptive=False)
    assert feed(c, 10, lambda i: 0.0, 0.3, lambda n: 1.0) == 3


def test_choice_tracks_per_position_acceptance():
    c = AdaptiveK(max_depth=8, initial_k=6)
    # The first two positions are always right, the third never: K=2 is best.
    k = feed(c, 40, lambda i: 1.0 if i < 2 else 0.0, draft_cost=0.2, verify_cost=lambda n: 1 + 0.1 * (n - 1))
    assert k == 2


def test_new_request_inherits_measured_costs_and_skips_warmup():
    first = AdaptiveK(max_depth=8, initial_k=4)
    feed(first, 10, lambda i: 1.0, draft_cost=0.05, verify_cost=lambda n: 1 + 0.1 * (n - 1))
    second = AdaptiveK(max_depth=8, initial_k=4)
    assert second.choose() == 4  # warm-up at the configured K
    second.inherit_costs(first)
    rates = {k: second.expected_rate(k) for k in range(9)}
    assert None not in rates.values()  # costs are known before this request measured anything
    assert second.choose() == max(rates, key=rates.get) == 8  # the pair's measured acceptance, cheap draft


def test_catch_up_is_priced_from_its_own_passes_else_from_the_targets_prompt_pass():
    from exo.speculative.adaptive import PRIOR_DRAFT_SIZE

    c = AdaptiveK(max_depth=8, initial_k=4)
    assert c.catch_up_cost(100) is None  # nothing measured
    c.observe_prompt_pass(500, 2.0)  # 4 ms per prompt token on the target
    assert c.catch_up_cost(100) == pytest.approx(100 * 0.004 * PRIOR_DRAFT_SIZE)
    c.observe_catch_up(50, 0.05)  # the draft's own pass: 1 ms per token
    assert c.catch_up_cost(100) == pytest.approx(0.1)
    later = AdaptiveK(max_depth=8, initial_k=4)
    later.inherit_costs(c)
    assert later.catch_up_cost(100) == pytest.approx(0.1)


def test_trusted_depth_counts_leading_positions_above_threshold():
    c = AdaptiveK(max_depth=8, initial_k=4)
    assert c.trusted_depth(0.8) == 0  # nothing measured yet
    for _ in range(20):
        c.observe(4, 2, 0.4, 1.0)  # positions 0 and 1 always accepted, position 2 rejected
    assert c.trusted_depth(0.8) == 2


def test_a_new_request_starts_from_the_pairs_measured_acceptance_lightly_held():
    first = AdaptiveK(max_depth=8, initial_k=4)
    feed(first, 30, lambda i: 1.0, draft_cost=0.2, verify_cost=lambda n: 1 + 0.1 * (n - 1))
    second = AdaptiveK(max_depth=8, initial_k=4)
    second.inherit_costs(first)
    assert second.acceptance_at(0) > 0.95 and second.choose() == first.choose() == 8
    for _ in range(3):
        second.observe(8, 0, 1.6, 1.7)  # this text is different: three rejections turn it
    assert second.acceptance_at(0) < 0.5 and second.expected_rate(8) < 0.5 * first.expected_rate(8)


def test_the_first_pass_at_a_new_length_is_not_kept():
    """A warm-up verify of 5 tokens that took 10x too long would price K = 4 out for good
    (K = 4 is then never tried again to correct it)."""
    c = AdaptiveK(max_depth=8, initial_k=4)
    c.observe(4, 4, 0.4, 10.0)
    assert c.verify_cost(5) is None
    c.observe(4, 4, 0.4, 1.4)
    assert c.verify_cost(5) == pytest.approx(1.4)


def test_positions_not_yet_tried_are_trusted_like_the_deepest_tried():
    """Blocks cut after one token never try position 1: it borrows position 0's estimate,
    so a draft accepted 95 % of the time is not cut on its confidence for ever."""
    c = AdaptiveK(max_depth=8, initial_k=4)
    for _ in range(20):
        c.observe(1, 1, 0.2, 1.0)
    assert c.trusted_depth(0.8) == 8
    for _ in range(20):
        c.observe(3, 1, 0.6, 1.0)  # deeper positions now tried, and rejected
    assert c.trusted_depth(0.8) == 1


def test_one_outlier_moves_neither_the_estimate_nor_the_choice():
    c = AdaptiveK(max_depth=8, initial_k=4)
    feed(c, 12, lambda i: 1.0 if i < 3 else 0.0, draft_cost=0.1, verify_cost=lambda n: 1 + 0.05 * (n - 1))
    before_k, before_step = c.choose(), c.draft_step.value
    c.observe(before_k, 3, 50.0 * before_k, 1.2)  # one block hit by a page fault / compile
    assert c.draft_step.value == before_step == pytest.approx(0.1)
    assert c.choose() == before_k == 3


def test_draft_step_cost_is_per_forward_not_per_kept_token():
    c = AdaptiveK(max_depth=8, initial_k=4)
    c.observe(2, 2, draft_s=0.3, verify_s=1.0, draft_steps=3)  # a confidence cut dropped the 3rd
    assert c.draft_step.value == pytest.approx(0.1)


def test_overlapped_blocks_are_costed_by_their_cycle_not_the_sum_of_parts():
    """Drafting 3 s and verifying 1 s per block, a sum-of-parts model sees 4 s per block of
    about 3 tokens, worse than plain decoding's 1 token/s, and picks K = 0."""
    def run(cycle):
        c = AdaptiveK(max_depth=4, initial_k=3, warmup_steps=0)
        for _ in range(12):
            c.observe(3, 2, draft_s=3.0, verify_s=1.0, cycle_s=cycle)
        c.observe(0, 0, 0.0, 1.0)  # a plain step, uncontended
        return c

    summed = run(None)  # sequential: the parts add up
    assert summed.choose() == 0
    overlapped = run(2.0)  # real overlap: the block took half the sum of its parts
    assert overlapped.overlap.value == pytest.approx(0.5)
    assert overlapped.choose() > 0
    assert overlapped.expected_rate(3) == pytest.approx(summed.expected_rate(3) * 2)
    contended = run(4.0)  # two threads on shared cores: no gain from overlap, none assumed
    assert contended.choose() == 0 and contended.overlap.value == pytest.approx(1.0)
    heir = AdaptiveK(max_depth=4, initial_k=3)
    heir.inherit_costs(overlapped)
    assert heir.overlap.value == pytest.approx(0.5)


class FakeClock:
    """perf_counter that moves only when a model computes: costs are exact, never timed."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now

    @staticmethod
    def time() -> float:
        import time

        return time.time()  # event timestamps stay wall time


def clocked_engine(clock, per_call, per_token):
    """A real MLX engine whose forwards cost `per_call + per_token * tokens` on the fake clock."""
    import numpy as np

    from exo.inference.mlx.engine import MLXInferenceEngine

    class Clocked(MLXInferenceEngine):
        def __init__(self):
            super().__init__()
            self.inputs: list[int] = []

        async def infer_tensor(self, request_id, shard, input_data, inference_state=None):
            out = await super().infer_tensor(request_id, shard, input_data, inference_state)
            n = int(np.asarray(input_data).size)
            self.inputs.append(n)
            clock.now += per_call + per_token * n
            return out

    return Clocked()


@pytest.mark.parametrize("pipelined", [False, True])
async def test_long_prompt_leaves_the_draft_step_cost_and_k_alone(make_speculative, tmp_path, monkeypatch, pipelined):
    """1,200 prompt tokens cost the draft 13 steps' worth: all of it is the prefill's."""
    from tests.helpers.tiny_models import make_tiny_model

    tiny_llama = make_tiny_model(tmp_path / "tiny-llama-2k", "llama", layers=4, seed=1, context=2048)
    from exo.inference.generate import GenerationParams
    from exo.speculative.pipeline import common, pipelined as pipelined_module, sequential

    clock = FakeClock()
    for module in (common, sequential, pipelined_module):
        monkeypatch.setattr(module, "time", clock)
    draft_step, draft_token = 1.0, 0.01
    target, draft = clocked_engine(clock, 5.0, 0.1), clocked_engine(clock, draft_step, draft_token)
    engine = make_speculative(tiny_llama, target=target, draft=draft, draft_tokens=4, pipelined=pipelined,
                              acceptance_threshold=0.0)  # a random tiny model is never confident: costs alone
    shard = await engine.full_shard(str(tiny_llama))
    prompt = [(7 * i) % 250 + 1 for i in range(1200)]
    params = GenerationParams(max_tokens=40, temperature=0.0)
    async with engine.generate(shard, prompt, params, eos_ids=frozenset()) as blocks:
        async for _ in blocks:
            pass
    request = engine.last_request
    assert draft.inputs[0] == len(prompt) and max(draft.inputs[1:]) <= 2  # one prompt pass, then steps
    histogram = request.metrics.k_histogram
    # A same-model draft: K grows past the configured 4 (deep sequentially, where costs are
    # exact; pipelined, the one fake clock also moves with the target mid-draft, so the costs
    # it learns, and how fast K grows, depend on how the two threads interleave).
    assert histogram.get(0, 0) == 0 and max(histogram) >= (5 if pipelined else 6), histogram
    if not pipelined:  # sequentially the clock moves only with the model being timed: exact costs
        assert request.metrics.draft_prefill_time == pytest.approx(draft_step + draft_token * len(prompt))
        samples = request.controller.draft_step.samples
        assert all(draft_step <= s <= draft_step + 2 * draft_token for s in samples), samples
        step_time = request.metrics.draft_time / request.metrics.drafted
        assert step_time == pytest.approx(draft_step, rel=0.03)
    # The next request starts from those per-step costs, not from anything prompt-sized.
    async with engine.generate(shard, prompt[:30], params, eos_ids=frozenset()) as blocks:
        async for _ in blocks:
            pass
    inherited = engine.last_request.controller
    if not pipelined:  # (pipelined, the one fake clock also moves with the target mid-draft)
        assert inherited.draft_step.value == pytest.approx(draft_step, rel=0.03)
    assert engine.last_request.metrics.k_histogram.get(0, 0) == 0


def test_an_early_miss_one_deeper_is_corrected_by_the_deeper_probe():
    """Position 1 misses during the first blocks, then the text turns copyable: without the
    probe one position deeper K stays at 1 (position 1 is never drafted again)."""
    def run(probe_every):
        c = AdaptiveK(max_depth=8, initial_k=2, probe_every=probe_every)
        feed(c, 6, lambda i: 1.0 if i < 1 else 0.0, draft_cost=0.3, verify_cost=lambda n: 1 + 0.1 * (n - 1))
        assert c.best_k() == 1
        return feed(c, 120, lambda i: 1.0, draft_cost=0.3, verify_cost=lambda n: 1 + 0.1 * (n - 1))

    assert run(probe_every=20) >= 4
    assert run(probe_every=10**9) == 1  # the sealed estimate the probe exists for
