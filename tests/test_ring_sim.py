"""The ring simulator against the cases that have a closed form."""

import pytest

from tools.ring_sim import Policy, RingSpec, StageCost, plain_ring, simulate

STAGES = [StageCost(0.10, 0.01), StageCost(0.12, 0.01), StageCost(0.08, 0.02)]
HOP = 0.005


def ring(**overrides) -> RingSpec:
    return RingSpec(**{"stages": STAGES, "hop_s": HOP, "draft_step_s": 0.02, **overrides})


def pass_time(spec: RingSpec, tokens: int) -> float:
    """One block's trip: every stage's compute, P - 1 forwards and the result's hop home."""
    return sum(s.seconds(tokens) for s in spec.stages) + len(spec.stages) * spec.hop_s


def test_the_plain_ring_is_one_token_per_ring_pass():
    spec = ring()
    result = plain_ring(spec, tokens=200)
    assert result.tokens == 200
    assert result.seconds == pytest.approx(200 * pass_time(spec, 1), rel=1e-12)
    assert result.messages == 200 * 3  # two forwards and a result per token
    one_node = plain_ring(RingSpec([StageCost(0.1, 0.01)], hop_s=HOP), tokens=50)
    assert one_node.seconds == pytest.approx(50 * 0.11) and one_node.messages == 0


@pytest.mark.parametrize("defer_bonus,tokens_per_block,inputs", [(False, 5, 5), (True, 4, 4)])
def test_one_block_in_flight_fully_accepted(defer_bonus, tokens_per_block, inputs):
    """W = 1, acceptance 1: K + 1 tokens per block with the bonus sampled (sequential), K
    with it held for the next block, whose input is then only its drafts."""
    spec = ring()
    result = simulate(spec, Policy(k=4, window=1, acceptance=[1.0], defer_bonus=defer_bonus), tokens=400)
    first = 4 * 0.02 + pass_time(spec, 5)
    per_block = 4 * 0.02 + pass_time(spec, inputs)
    blocks = 400 // tokens_per_block
    assert result.blocks == blocks
    assert result.seconds == pytest.approx(first + (blocks - 1) * per_block, rel=1e-12)


@pytest.mark.parametrize("window", [1, 2, 4])
def test_nothing_accepted_gives_one_token_per_block_whatever_the_window(window):
    """Acceptance 0: every block is rejected at its first draft; blocks sent after it are
    cancelled by the broadcast before the next epoch's block reaches their stage, so with
    stages that stop a cancelled pass a window changes nothing."""
    spec = ring(abort_running=True)
    result = simulate(spec, Policy(k=4, window=window, acceptance=[0.0]), tokens=100)
    assert result.tokens == 100 and result.blocks == 100
    assert result.seconds == pytest.approx(100 * (4 * 0.02 + pass_time(spec, 5)), rel=1e-12)
    if window > 1:
        assert sum(s.dropped for s in result.stages) + sum(s.discarded_s > 0 for s in result.stages) > 0
    finishing = simulate(ring(), Policy(k=4, window=window, acceptance=[0.0]), tokens=100)
    assert finishing.seconds >= result.seconds - 1e-9  # finishing a cancelled pass can only delay
    # A draft slower than the ring is still drafting the next block when the rejection comes
    # back; it stops at once and the corrected epoch's draft starts.
    slow = ring(abort_running=True, draft_step_s=0.2)
    result = simulate(slow, Policy(k=4, window=window, acceptance=[0.0]), tokens=50)
    assert result.seconds == pytest.approx(50 * (4 * 0.2 + pass_time(slow, 5)), rel=1e-12)


def test_a_full_window_runs_at_the_bottleneck_stage():
    """Acceptance 1, a free draft, W large: the slowest stage is never idle, K tokens per
    pass of it (fixed costs only, so every pass costs the same)."""
    stages = [StageCost(0.10), StageCost(0.15)]
    spec = RingSpec(stages, hop_s=0.02)
    result = simulate(spec, Policy(k=6, window=8, acceptance=[1.0]), tokens=6 * 400)
    assert result.tokens_per_second == pytest.approx(6 / 0.15, rel=0.01)
    assert result.idle_s(1) / result.seconds < 0.01


def test_a_short_window_is_bounded_by_its_round_trip():
    """W blocks per round trip when the round trip is longer than W bottleneck passes."""
    spec = RingSpec([StageCost(0.10), StageCost(0.10)], hop_s=0.05)
    result = simulate(spec, Policy(k=4, window=2, acceptance=[1.0]), tokens=4 * 600)
    round_trip = 0.10 + 0.05 + 0.10 + 0.05
    assert result.tokens_per_second == pytest.approx(2 * 4 / round_trip, rel=0.01)


def test_random_acceptance_matches_the_expected_tokens_per_block():
    """W = 1, sequential: every block costs the same; tokens per block average 1 + a + ... + a^K."""
    spec = ring()
    a, k = 0.7, 4
    result = simulate(spec, Policy(k=k, window=1, acceptance=[a], defer_bonus=False), tokens=30000, seed=3)
    expected = sum(a ** i for i in range(k + 1)) / (k * 0.02 + pass_time(spec, k + 1))
    assert result.tokens_per_second == pytest.approx(expected, rel=0.02)


def test_a_draft_on_stage_zeros_core_waits_for_it():
    """With the draft sharing stage 0's core, W = 1 pays draft and stage 0 in turn exactly
    as before (nothing else competes); a window then contends with the stage."""
    shared = ring(draft_shares_stage0=True)
    policy = Policy(k=4, window=1, acceptance=[1.0], defer_bonus=False)
    assert simulate(shared, policy, tokens=100).seconds == pytest.approx(simulate(ring(), policy, tokens=100).seconds)
    windowed = Policy(k=4, window=3, acceptance=[1.0])
    assert simulate(shared, windowed, tokens=400).seconds > simulate(ring(), windowed, tokens=400).seconds


def test_bad_policies_are_refused():
    with pytest.raises(ValueError):
        simulate(ring(), Policy(k=4, window=2, defer_bonus=False))
    with pytest.raises(ValueError):
        simulate(ring(), Policy(k=-1))
    with pytest.raises(ValueError):
        simulate(RingSpec([]), Policy(k=1))


def test_measured_blocks_replay_the_closed_forms():
    """(K, accepted) pairs drawn from a measured run: one fully accepted pair is the same ring
    as acceptance 1; only plain steps (K = 0) never overlap, whatever the window, so they are
    the plain ring, message for message."""
    spec = ring()
    measured = simulate(spec, Policy(k=0, window=3, blocks=[(4, 4)]), tokens=400)
    closed = simulate(spec, Policy(k=4, window=3, acceptance=[1.0]), tokens=400)
    assert measured.seconds == pytest.approx(closed.seconds, rel=1e-12) and measured.blocks == closed.blocks
    plain_steps = simulate(spec, Policy(k=0, window=4, blocks=[(0, 0)]), tokens=100)
    plain = plain_ring(spec, tokens=100)
    assert plain_steps.seconds == pytest.approx(plain.seconds, rel=1e-12)
    assert plain_steps.messages == plain.messages
    # A plain step after a fully accepted block samples the held row: no stage computes it.
    mixed = simulate(spec, Policy(k=0, window=2, blocks=[(4, 4), (0, 0)]), tokens=300, seed=1)
    assert mixed.stages[0].passes == mixed.stages[2].passes < mixed.blocks
