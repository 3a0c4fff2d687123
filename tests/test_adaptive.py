"""Adaptive K: follows acceptance and cost, goes to K=0 when speculation loses, probes back."""

from exo.speculative.adaptive import AdaptiveK


def feed(controller, steps, accept_prob_by_pos, draft_cost, verify_cost):
    for _ in range(steps):
        k = controller.choose()
        accepted = 0
        while accepted < k and accept_prob_by_pos(accepted) >= 0.5:
            accepted += 1
        controller.observe(k, accepted, k * draft_cost, verify_cost(k + 1))
    return controller.choose()


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
    assert second.choose() == max(rates, key=rates.get) == 3  # prior acceptance 0.7, cheap draft


def test_trusted_depth_counts_leading_positions_above_threshold():
    c = AdaptiveK(max_depth=8, initial_k=4)
    assert c.trusted_depth(0.8) == 0  # nothing measured yet
    for _ in range(20):
        c.observe(4, 2, 0.4, 1.0)  # positions 0 and 1 always accepted, position 2 rejected
    assert c.trusted_depth(0.8) == 2
