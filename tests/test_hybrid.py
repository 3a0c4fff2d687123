"""The suffix and hybrid drafters through real engines: output exactly the target's (greedy
and sampled, a deliberately wrong rule caught), copies where the text repeats, the
choice between copy and model, and per-drafter metrics."""

import anyio
import numpy as np
import pytest

import exo.speculative.verifier as verifier_module
from exo.inference.generate import GenerationParams
from exo.inference.sampling import sample
from exo.speculative.rejection import verify_block
from exo.speculative.drafters.hybrid import HybridDrafter, match_bucket
from exo.speculative.events import EventBus
from tests.helpers.decoding import collect, plain_tokens
from tests.helpers.laws import joint_law, sampled_tv

REPEATING = [5, 9, 13, 17, 21, 25, 29] * 4  # its end recurs: the suffix drafter copies from it
PROMPTS = [REPEATING, [10, 20, 30], list(range(40, 72))]


async def loaded(make_speculative, target_dir, draft_dir, **config):
    engine = make_speculative(draft_dir, **config)
    shard = await engine.full_shard(str(target_dir))
    await engine.ensure_shard(shard)
    return engine, shard


@pytest.mark.parametrize("pipelined", [False, True])
@pytest.mark.parametrize("drafter", ["suffix", "hybrid"])
async def test_greedy_output_is_plain_decodings(make_speculative, tiny_llama, tiny_llama_other, drafter, pipelined):
    engine, shard = await loaded(make_speculative, tiny_llama, tiny_llama_other, drafter=drafter, pipelined=pipelined)
    params = GenerationParams(max_tokens=40, temperature=0.0)
    for prompt in PROMPTS:
        got = await collect(engine.generate(shard, prompt, params, eos_ids=frozenset()))
        assert got == await plain_tokens(tiny_llama, prompt, params)
    per = engine.get_metrics()["per_drafter"]
    if drafter == "suffix":
        assert per["suffix"]["drafted_tokens"] > 0  # copies were tried (a random model rejects them)
        assert "model" not in per  # no model drafts without the model
    else:  # whichever it found worth more: copies (rarely right here) or the random model's drafts
        assert sum(per.get(name, {}).get("drafted_tokens", 0) for name in ("suffix", "model")) > 0


LIST = ("1. The quick brown fox jumps over the lazy dog.\n2. The quick brown fox jumps over the lazy dog.\n"
        "3. The quick brown fox jumps over the lazy dog.\n4. The quick")


@pytest.mark.parametrize("pipelined", [False, True])
async def test_a_real_model_repeating_its_context_accepts_long_copies(make_speculative, smollm2_dir, pipelined):
    engine, shard = await loaded(make_speculative, smollm2_dir, smollm2_dir, drafter="suffix", pipelined=pipelined)
    prompt = engine.tokenizer.encode(LIST)
    params = GenerationParams(max_tokens=24, temperature=0.0)
    assert await collect(engine.generate(shard, prompt, params, eos_ids=frozenset())) == \
        await plain_tokens(smollm2_dir, prompt, params)
    metrics = engine.get_metrics()
    per = metrics["per_drafter"]["suffix"]
    assert per["accepted_tokens"] >= 5 and per["tokens_per_verify"] >= 2
    assert max(int(k) for k in metrics["last_request"]["k_histogram"]) >= 4  # long copies were drafted


async def test_the_suffix_drafter_needs_no_draft_model(make_speculative, tiny_llama, tmp_path):
    missing = tmp_path / "no-such-model"
    engine, shard = await loaded(make_speculative, tiny_llama, missing, drafter="suffix")
    params = GenerationParams(max_tokens=30, temperature=0.0)
    assert await collect(engine.generate(shard, REPEATING, params, eos_ids=frozenset())) == \
        await plain_tokens(tiny_llama, REPEATING, params)
    assert engine.draft_load_failures == 0 and engine.draft.shard is None
    assert engine.get_metrics()["per_drafter"]["suffix"]["drafted_tokens"] > 0


async def test_auto_is_hybrid_with_a_draft_and_suffix_without(make_speculative, tiny_llama, tmp_path):
    params = GenerationParams(max_tokens=30, temperature=0.0)
    with_draft, shard = await loaded(make_speculative, tiny_llama, tiny_llama, drafter="auto")
    await collect(with_draft.generate(shard, list(range(40, 60)), params, eos_ids=frozenset()))
    assert with_draft.get_metrics()["per_drafter"].get("model", {}).get("drafted_tokens", 0) > 0
    without, shard = await loaded(make_speculative, tiny_llama, tmp_path / "missing", drafter="auto")
    assert await collect(without.generate(shard, REPEATING, params, eos_ids=frozenset())) == \
        await plain_tokens(tiny_llama, REPEATING, params)
    per = without.get_metrics()["per_drafter"]
    assert "model" not in per and per["suffix"]["drafted_tokens"] > 0


async def _copying_prompt(target, shard, top_k: int) -> list[int]:
    """A prompt [a, b, x, c, a, b] whose copy x is in the target's top-k after it, so a wrong
    rule for deterministic drafts changes the output's law (a random model's top-k depends
    on x, hence the search; about one try in a hundred hits)."""
    for c in range(13, 23):
        for x in range(320):
            prompt = [11, 12, x, c, 11, 12]
            logits, _ = await target.infer_tensor("probe", shard, np.asarray([prompt]))
            target.free_cache("probe")
            if x in np.argsort(logits[0, -1])[-top_k:]:
                return prompt
    raise AssertionError("no copy inside the target's top-k found")


def _accepts_every_copy(target_probs, draft_probs, draft_tokens, rng):
    """Wrong on purpose: a deterministic draft is kept without the p(x) test (the bug of
    treating a copy like a draft the target agreed with)."""
    if draft_probs is not None:
        return verify_block(target_probs, draft_probs, draft_tokens, rng)
    k = np.asarray(draft_tokens).size
    return [int(t) for t in np.asarray(draft_tokens).reshape(-1)] + [sample(target_probs[k], rng)]


@pytest.mark.heavy
@pytest.mark.parametrize("pipelined", [False, True])
async def test_sampled_copies_follow_the_targets_law_and_a_wrong_rule_does_not(
        make_speculative, mlx_engine, tiny_llama, pipelined, monkeypatch):
    """T = 1, top-k 3: three tokens after a prompt whose end the suffix drafter copies from.
    The joint law of 27 outcomes, from 800 seeded requests; the same test with copies
    kept unchecked must fail. (The rule's residual, p without x, has its own 1e5-trial test
    with a wrong variant in test_sampling.py: here the copies mostly fall outside the random
    target's top-k, so only the accept test has power.)"""
    params = dict(temperature=1.0, top_k=3)
    target = mlx_engine()
    target_shard = await target.full_shard(str(tiny_llama))
    prompt = await _copying_prompt(target, target_shard, top_k=3)
    law = await joint_law(target, target_shard, prompt, params)
    assert len(law) == 27
    # A fixed K: the suffix drafter copies whenever it matches, with no cost-based choice.
    engine, shard = await loaded(make_speculative, tiny_llama, tiny_llama, drafter="suffix",
                                 adaptive_speculation=False, pipelined=pipelined)
    assert await sampled_tv(engine, shard, prompt, params, law, 800) < 0.1  # 0.04-0.06 measured
    per = engine.get_metrics()["per_drafter"]["suffix"]
    assert per["blocks"] >= 200 and per["drafted_tokens"] > per["accepted_tokens"]  # copies were judged
    if not pipelined:
        monkeypatch.setattr(verifier_module, "verify_block", _accepts_every_copy)
        assert await sampled_tv(engine, shard, prompt, params, law, 200) > 0.15  # 0.33 measured


def _measured(draft_step: float, acceptance: float) -> "AdaptiveK":
    """A controller that has measured a 10 ms target step growing 1 ms per token, a draft
    step of `draft_step` seconds and a per-position acceptance of `acceptance`."""
    from exo.speculative.adaptive import AdaptiveK, DecayedRate, WindowedMedian

    controller = AdaptiveK(8, 4)
    controller.steps = 10
    controller.verify = {n: WindowedMedian(9, 0.010 + 0.001 * (n - 1)) for n in (1, 2, 5, 9, 33)}
    controller.draft_step = WindowedMedian(9, draft_step)
    controller.acceptance = [DecayedRate(acceptance) for _ in range(8)]
    for rate in controller.acceptance:
        rate.observed = True
    return controller


@pytest.mark.parametrize("draft_step,model_acceptance,copy_acceptance,expected", [
    (0.002, 0.9, 0.1, "model"),  # a cheap, accurate model beats copies that miss
    (0.002, 0.5, 0.95, "suffix"),  # a long repeat beats a so-so model
    (0.012, 0.3, 0.05, "none"),  # neither pays: plain decoding
])
def test_the_hybrid_picks_the_best_expected_rate(draft_step, model_acceptance, copy_acceptance, expected):
    from exo.speculative.adaptive import DecayedRate
    from exo.speculative.drafters import DraftBlock
    from exo.speculative.drafters.suffix import SuffixDrafter

    controller = _measured(draft_step, model_acceptance)
    hybrid = HybridDrafter(None, SuffixDrafter(), controller)
    hybrid.copy_acceptance[8] = DecayedRate(copy_acceptance)
    copy = DraftBlock(list(range(8)), None, 100, drafter="suffix")
    assert hybrid._choose(copy, 8, model_k=controller.choose() or 4) == expected


@pytest.mark.parametrize("left,expected", [(8, "suffix"), (256, "model")])
def test_a_lagging_model_is_chosen_only_where_the_rest_of_the_answer_pays_for_its_catch_up(left, expected):
    """Without a lag the model (acceptance 0.9) beats copies (0.6); 100 unseen tokens at a
    measured 1.2 ms each cost 0.12 s, worth it over 256 more tokens but not over 8."""
    from exo.speculative.adaptive import DecayedRate, WindowedMedian
    from exo.speculative.drafters import DraftBlock
    from exo.speculative.drafters.suffix import SuffixDrafter

    controller = _measured(0.002, 0.9)
    controller.catch_up = WindowedMedian(9, 0.0012)
    hybrid = HybridDrafter(None, SuffixDrafter(), controller)
    hybrid.copy_acceptance[8] = DecayedRate(0.6)
    copy = DraftBlock(list(range(8)), None, 100, drafter="suffix")
    k = controller.choose()
    assert hybrid._choose(copy, 8, k) == "model"
    assert hybrid._choose(copy, 8, k, lag=100, left=left) == expected


async def test_blocks_and_events_name_their_drafter(make_speculative, tiny_llama, tiny_llama_other):
    events = EventBus()
    # A fixed K copies whenever there is a copy (any earlier token, with a minimum match of 1).
    engine, shard = await loaded(make_speculative, tiny_llama, tiny_llama_other, drafter="hybrid", events=events,
                                 adaptive_speculation=False, suffix_min_match=1)
    seen = []
    with events.subscribe() as subscription:
        await collect(engine.generate(shard, REPEATING, GenerationParams(max_tokens=30), eos_ids=frozenset()))
        with anyio.move_on_after(0.5):
            async for event in subscription:
                seen.append(event)
                if type(event).__name__ == "MetricsUpdate" and event.emitted_tokens >= 29:
                    break
    verified = [e for e in seen if type(e).__name__ == "BlockVerified"]
    assert verified and {e.drafter for e in verified} <= {"model", "suffix", "none"}
    assert any(e.drafter == "suffix" for e in verified)
    last = [e for e in seen if type(e).__name__ == "MetricsUpdate"][-1]
    assert sum(d.blocks for d in last.per_drafter.values()) == len(verified)


def test_match_buckets():
    assert [match_bucket(n) for n in (2, 3, 4, 7, 8, 15, 16, 31, 32, 500)] == [2, 3, 4, 4, 8, 8, 16, 16, 32, 32]


def test_a_copy_is_scored_against_what_was_committed_whoever_drafted():
    """Candidates are scored from the final tokens (unbiased for deterministic drafts), not
    from which drafter won the block, and only once their fate is decided."""
    from exo.speculative.adaptive import AdaptiveK
    from exo.speculative.drafters.hybrid import _Candidate
    from exo.speculative.drafters.suffix import SuffixDrafter

    hybrid = HybridDrafter(None, SuffixDrafter(), AdaptiveK(8, 4))
    hybrid._pending = [_Candidate(10, [1, 2, 3, 4], 8)]
    hybrid._final = 12
    hybrid._score(list(range(10)) + [1, 2])  # two kept, the rest still open
    assert len(hybrid._pending) == 1 and not hybrid._rate(8).observed
    hybrid._final = 13
    hybrid._score(list(range(10)) + [1, 2, 9])  # the third differs: 2 kept, 1 rejected
    assert hybrid._pending == []
    rate = hybrid._rate(8)
    prior = 8 / 10 * 2  # L / (L + 2) with the weight of two observations
    assert rate.observed and rate.hits == pytest.approx(prior * 0.9 ** 3 + 0.9 ** 2 + 0.9) and \
        rate.misses == pytest.approx((2 - prior) * 0.9 ** 3 + 1)


@pytest.mark.parametrize("pipelined", [False, True])
async def test_a_hybrid_switching_drafter_every_block_stays_exact(make_speculative, tiny_llama, monkeypatch,
                                                                   pipelined):
    """Model, copy, none, model, ...: the model's cache catches up after copies and stays
    exact through rollbacks (same-model draft, so its blocks are all accepted). The choice
    goes by the block's position, not by call order: the pipelined scheduler drafts blocks it
    then drops, and which ones depends on timing. K is fixed at 4: adaptive K follows timing,
    and a K that is a multiple of 3 would keep every block's position in one class."""
    choices = ("model", "suffix", "none")
    monkeypatch.setattr(HybridDrafter, "_choose", lambda self, copy, bucket, model_k, *rest:
                        choices[copy.base_length % 3] if copy.tokens else "model")
    engine, shard = await loaded(make_speculative, tiny_llama, tiny_llama, drafter="hybrid", pipelined=pipelined,
                                 suffix_min_match=1,  # copies after any seen token: most blocks have one
                                 adaptive_speculation=False, draft_tokens=4)
    params = GenerationParams(max_tokens=48, temperature=0.0)
    for prompt in PROMPTS:
        assert await collect(engine.generate(shard, prompt, params, eos_ids=frozenset())) == \
            await plain_tokens(tiny_llama, prompt, params)
    per = engine.get_metrics()["per_drafter"]
    assert per["model"]["acceptance_rate"] == 1.0 and per["suffix"]["blocks"] > 0


async def test_a_resumed_copy_is_scored_under_its_own_estimate():
    """A copy resumed past a replaced token is not judged by (nor does it move) the estimate
    of matches of its length: its odds are those of the rewrite going on, not of a repeat."""
    import random

    from exo.speculative.adaptive import AdaptiveK
    from exo.speculative.drafters.hybrid import RESUMED
    from exo.speculative.drafters.suffix import SuffixDrafter

    rng = random.Random(7)
    source = [rng.randrange(1000) for _ in range(60)]
    prompt = [rng.randrange(1000) for _ in range(20)] + source
    hybrid = HybridDrafter(None, SuffixDrafter(), AdaptiveK(32, 4))
    await hybrid.prefill("r", prompt)
    params, draws = GenerationParams(max_tokens=64), np.random.default_rng(0)
    committed = prompt + source[:8]
    hybrid.accept("r", len(committed))
    assert (await hybrid.propose("r", committed, 32, params, 0.0, draws)).tokens == source[8:16]
    committed += source[8:11] + [5000]  # three kept, the fourth replaced
    hybrid.accept("r", len(committed))
    block = await hybrid.propose("r", committed, 32, params, 0.0, draws)
    assert block.tokens == source[12:23] and hybrid._pending[-1].bucket == RESUMED
    assert hybrid._rate(8).observed and not hybrid._rate(RESUMED).observed  # the first copy was scored
    committed += source[12:23] + [source[23]]
    hybrid.accept("r", len(committed))
    await hybrid.propose("r", committed, 32, params, 0.0, draws)
    assert hybrid._rate(RESUMED).observed and hybrid._rate(RESUMED).value > 0.5  # all 11 kept



async def test_a_hybrid_serves_one_request():
    """Its copy estimates and pending candidates are one request's: a second id is refused
    before anything of the first is touched, and releasing it frees nothing of the first."""
    from exo.speculative.adaptive import AdaptiveK
    from exo.speculative.drafters.suffix import SuffixDrafter

    hybrid = HybridDrafter(None, SuffixDrafter(), AdaptiveK(8, 4))
    prompt = [5, 9, 13, 5, 9]
    await hybrid.prefill("r", prompt)
    params, draws = GenerationParams(max_tokens=8), np.random.default_rng(0)
    with pytest.raises(RuntimeError, match="bound to one request"):
        await hybrid.propose("s", prompt, 4, params, 0.0, draws)
    with pytest.raises(RuntimeError, match="bound to one request"):
        hybrid.accept("s", len(prompt))
    with pytest.raises(RuntimeError, match="bound to one request"):
        hybrid.release("s")
    assert (await hybrid.propose("r", prompt, 4, params, 0.0, draws)).tokens == [13, 5]
    hybrid.release("r")
