"""warp and verify_block: exact semantics and the distribution they produce."""

import numpy as np
import pytest

from exo.inference.sampling import sample, warp
from exo.speculative.rejection import verify_block


def test_greedy_is_one_hot_lowest_id_on_ties():
    probs = warp(np.array([[0.0, 5.0, 5.0, 1.0]]), temperature=0)
    assert probs.tolist() == [[0.0, 1.0, 0.0, 0.0]]


def test_temperature_top_k_top_p():
    logits = np.log(np.array([0.1, 0.2, 0.3, 0.4]))
    np.testing.assert_allclose(warp(logits, 1.0), [0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(warp(logits, 1.0, top_k=2), [0, 0, 3 / 7, 4 / 7])
    np.testing.assert_allclose(warp(logits, 1.0, top_p=0.7), [0, 0, 3 / 7, 4 / 7])
    np.testing.assert_allclose(warp(logits, 1.0, top_p=0.71), [0, 0.2 / 0.9, 0.3 / 0.9, 0.4 / 0.9])
    hot = warp(logits, 0.5)
    np.testing.assert_allclose(hot, np.array([1, 4, 9, 16]) / 30)
    with pytest.raises(ValueError):
        warp(logits, -1.0)
    with pytest.raises(ValueError):
        warp(logits, 1.0, top_p=0.0)


def test_sample_never_picks_zero_mass():
    rng = np.random.default_rng(0)
    probs = np.array([0.0, 0.5, 0.0, 0.5, 0.0])
    assert {sample(probs, rng) for _ in range(2000)} == {1, 3}


def random_dist(rng, vocab, sparsity=0.3):
    p = rng.random(vocab) ** 3
    p[rng.random(vocab) < sparsity] = 0.0
    p[rng.integers(vocab)] += 0.05
    return p / p.sum()


def first_token_histogram(p, q, trials, rng, verifier=verify_block):
    counts = np.zeros(p.size)
    target = np.stack([p, p])
    for _ in range(trials):
        d = sample(q, rng)
        counts[verifier(target, q[None], np.array([d]), rng)[0]] += 1
    return counts / trials


def total_variation(a, b):
    return 0.5 * np.abs(a - b).sum()


def test_first_token_follows_target_distribution():
    rng = np.random.default_rng(1234)
    vocab = 12
    p, q = random_dist(rng, vocab), random_dist(rng, vocab)
    observed = first_token_histogram(p, q, 100_000, rng)
    # Chi-square against p (cells with p > 0); 11 dof critical value at 1e-4 is ~37.
    mask = p > 0
    assert observed[~mask].sum() == 0
    chi2 = 100_000 * ((observed[mask] - p[mask]) ** 2 / p[mask]).sum()
    assert chi2 < 40, chi2
    assert total_variation(observed, p) < 0.01


def without_residual(target_probs, draft_probs, draft_tokens, rng):
    """A subtly wrong verifier: resamples from p instead of max(0, p - q) on rejection."""
    token = int(draft_tokens[0])
    if rng.random() * draft_probs[0, token] < target_probs[0, token]:
        return [token]
    return [sample(target_probs[0], rng)]


def test_a_verifier_without_residual_fails_the_same_check():
    rng = np.random.default_rng(1234)
    p, q = random_dist(rng, 12), random_dist(rng, 12)
    observed = first_token_histogram(p, q, 100_000, rng, verifier=without_residual)
    assert total_variation(observed, p) > 0.03


def test_acceptance_rate_is_sum_of_min():
    rng = np.random.default_rng(7)
    p, q = random_dist(rng, 16), random_dist(rng, 16)
    target = np.stack([p, p])
    accepted = 0
    trials = 50_000
    for _ in range(trials):
        d = sample(q, rng)
        accepted += len(verify_block(target, q[None], np.array([d]), rng)) == 2
    assert abs(accepted / trials - np.minimum(p, q).sum()) < 0.01


def test_same_distribution_accepts_everything():
    rng = np.random.default_rng(5)
    p = random_dist(rng, 20)
    k = 5
    for _ in range(2000):
        drafts = np.array([sample(p, rng) for _ in range(k)])
        out = verify_block(np.tile(p, (k + 1, 1)), np.tile(p, (k, 1)), drafts, rng)
        assert out[:k] == drafts.tolist() and len(out) == k + 1


def test_greedy_semantics_and_edge_cases():
    rng = np.random.default_rng(0)
    vocab = 6
    one_hot = lambda ids: np.eye(vocab)[ids]  # noqa: E731
    target = one_hot([2, 3, 4, 5])
    # Drafts 2, 3 agree; 1 disagrees -> keep two, then the target's argmax 4.
    assert verify_block(target, one_hot([2, 3, 1]), np.array([2, 3, 1]), rng) == [2, 3, 4]
    assert verify_block(target, one_hot([2, 3, 4]), np.array([2, 3, 4]), rng) == [2, 3, 4, 5]
    # K = 0: just the bonus sample.
    assert verify_block(one_hot([1]), np.zeros((0, vocab)), np.array([], dtype=int), rng) == [1]
    # q = 0 for the drafted token: never accepted, the residual decides.
    p = np.array([0.5, 0.5, 0, 0, 0, 0])
    q = np.array([1.0, 0, 0, 0, 0, 0])
    outs = {verify_block(np.stack([p, p]), q[None], np.array([1]), rng)[0] for _ in range(200)}
    assert outs <= {0, 1}
    # Residual all zero (p == q exactly) falls back to p.
    assert verify_block(np.stack([p, p]), p[None], np.array([0]), rng)[0] in (0, 1)
    with pytest.raises(ValueError):
        verify_block(target, one_hot([2]), np.array([2, 3]), rng)


def test_two_position_joint_distribution():
    """Joint law of two emitted tokens when both positions are drafted."""
    rng = np.random.default_rng(99)
    vocab = 5
    p1, q1 = random_dist(rng, vocab, 0), random_dist(rng, vocab, 0)
    # Position-2 distributions depend on the first token (a prefix-dependent toy LM).
    p2 = np.stack([random_dist(rng, vocab, 0) for _ in range(vocab)])
    q2 = np.stack([random_dist(rng, vocab, 0) for _ in range(vocab)])
    counts = np.zeros((vocab, vocab))
    trials = 60_000
    for _ in range(trials):
        d1 = sample(q1, rng)
        d2 = sample(q2[d1], rng)
        out = verify_block(np.stack([p1, p2[d1], p2[d1]]), np.stack([q1, q2[d1]]), np.array([d1, d2]), rng)
        if len(out) == 1:  # first rejected: second token comes from the target given the correction
            out.append(sample(p2[out[0]], rng))
        counts[out[0], out[1]] += 1
    expected = p1[:, None] * p2
    assert total_variation(counts / trials, expected) < 0.015


# -- deterministic drafts (no draft distribution): keep x w.p. p(x), else sample p without x --

def deterministic_histogram(p, draft, trials, rng, verifier=verify_block):
    counts = np.zeros(p.size)
    target = np.stack([p, p])
    for _ in range(trials):
        counts[verifier(target, None, np.array([draft]), rng)[0]] += 1
    return counts / trials


def chi_square(observed, p, trials):
    mask = p > 0
    assert observed[~mask].sum() == 0
    return trials * ((observed[mask] - p[mask]) ** 2 / p[mask]).sum()


def test_deterministic_draft_first_token_follows_target_distribution():
    rng = np.random.default_rng(4321)
    vocab = 12
    p = random_dist(rng, vocab)
    for draft in (int(np.argmax(p)), int(np.argsort(p)[-4]), int(np.argmin(p))):  # likely, middling, impossible
        observed = deterministic_histogram(p, draft, 100_000, rng)
        # 11 dof critical value at 1e-4 is ~37 (cells with p > 0).
        assert chi_square(observed, p, 100_000) < 40, (draft, observed)
        assert total_variation(observed, p) < 0.01


def resampling_from_p(target_probs, draft_probs, draft_tokens, rng):
    """A subtly wrong rule: on rejection samples p itself, the rejected draft included."""
    token = int(draft_tokens[0])
    if rng.random() < target_probs[0, token]:
        return [token]
    return [sample(target_probs[0], rng)]


def test_a_deterministic_rule_that_keeps_the_draft_in_its_resample_fails_the_same_check():
    rng = np.random.default_rng(4321)
    p = random_dist(rng, 12)
    draft = int(np.argmax(p))
    observed = deterministic_histogram(p, draft, 100_000, rng, verifier=resampling_from_p)
    assert chi_square(observed, p, 100_000) > 40
    assert total_variation(observed, p) > 0.03


def test_deterministic_acceptance_rate_is_the_target_probability():
    rng = np.random.default_rng(11)
    p = random_dist(rng, 16)
    draft = int(np.argmax(p))
    trials = 50_000
    accepted = sum(len(verify_block(np.stack([p, p]), None, np.array([draft]), rng)) == 2 for _ in range(trials))
    assert abs(accepted / trials - p[draft]) < 0.01


def test_deterministic_draft_is_the_point_mass_case_of_the_residual_rule():
    """Same seed, same emitted tokens as drafting from a one-hot q: at temperature 0 this is
    today's greedy check, and at any temperature the residual of a point mass is p without x."""
    rng = np.random.default_rng(3)
    vocab, k = 10, 4
    for temperature in (0.0, 1.0):
        for trial in range(300):
            target = warp(rng.normal(size=(k + 1, vocab)) * 2, temperature)
            drafts = rng.integers(vocab, size=k)
            deterministic = verify_block(target, None, drafts, np.random.default_rng(trial))
            point_mass = verify_block(target, np.eye(vocab)[drafts], drafts, np.random.default_rng(trial))
            assert deterministic == point_mass
            if temperature == 0:
                argmax = target.argmax(axis=-1)
                agree = int(np.cumprod(drafts == argmax[:k]).sum())
                assert deterministic == [*drafts[:agree].tolist(), int(argmax[agree])]


def test_deterministic_two_position_joint_distribution():
    """Joint law of two emitted tokens for a deterministic two-token draft (d2 fixed by d1)."""
    rng = np.random.default_rng(17)
    vocab = 5
    p1 = random_dist(rng, vocab, 0)
    p2 = np.stack([random_dist(rng, vocab, 0) for _ in range(vocab)])  # prefix-dependent toy LM
    d1 = int(np.argmax(p1))
    d2 = int(np.argmax(p2[d1]))
    counts = np.zeros((vocab, vocab))
    trials = 100_000
    for _ in range(trials):
        out = verify_block(np.stack([p1, p2[d1], p2[d1]]), None, np.array([d1, d2]), rng)
        if len(out) == 1:  # first rejected: second token comes from the target given the correction
            out.append(sample(p2[out[0]], rng))
        counts[out[0], out[1]] += 1
    assert total_variation(counts / trials, p1[:, None] * p2) < 0.01
