"""Speculative decoding through real engines: exact greedy output, acceptance, fallback."""

import numpy as np
import pytest

from exo.inference.generate import GenerationParams
from exo.inference.mlx.engine import MLXInferenceEngine
from exo.speculative.adaptive import AdaptiveK
from exo.speculative.config import ConfigError
from exo.speculative.drafters import make_proposer
from tests.helpers.decoding import collect, plain_tokens
from tests.helpers.laws import joint_law, sampled_tv


@pytest.fixture
def speculative(make_speculative):
    """A loaded speculative engine over MLX target and draft (closed when the test ends)."""
    async def build(target_dir, draft_dir, **config):
        engine = make_speculative(draft_dir, **config)
        shard = await engine.full_shard(str(target_dir))
        await engine.ensure_shard(shard)
        return engine, shard

    return build


PROMPTS = [[10, 20, 30], [104, 101, 108, 108, 111], list(range(40, 72)), [7]]


@pytest.mark.parametrize("pipelined", [False, True])
async def test_an_overlapped_prompt_pass_is_exact_and_priced(tiny_llama, tiny_llama_other, pipelined, speculative):
    """Draft and target prompt passes at once (`--placement processes`): same output, and the
    target's pass is still recorded, so the hybrid can price a draft's catch-up from it."""
    params = GenerationParams(max_tokens=16, temperature=0.0)
    engine, shard = await speculative(tiny_llama, tiny_llama_other, pipelined=pipelined, overlap_prefill=True)
    prompt = PROMPTS[2]
    assert await collect(engine.generate(shard, prompt, params, eos_ids=frozenset())) == \
        await plain_tokens(tiny_llama, prompt, params)
    controller = engine.last_request.controller
    assert controller.prompt_pass.value is not None and controller.catch_up_cost(10) > 0
    assert engine.get_metrics()["last_request"]["draft_prefill_time"] > 0


@pytest.mark.parametrize("pipelined", [False, True])
@pytest.mark.parametrize("draft", ["tiny_llama", "tiny_llama_other"])
@pytest.mark.parametrize("config", [dict(draft_tokens=4, adaptive_speculation=False, acceptance_threshold=0),
                                    dict(draft_tokens=3), dict(draft_tokens=6, max_speculation_depth=6,
                                                               acceptance_threshold=0.5)])
async def test_greedy_identical_to_plain_tiny(request, tiny_llama, draft, config, pipelined, speculative):
    draft_dir = request.getfixturevalue(draft)
    params = GenerationParams(max_tokens=24, temperature=0.0)
    engine, shard = await speculative(tiny_llama, draft_dir, pipelined=pipelined, **config)
    for prompt in PROMPTS:
        expected = await plain_tokens(tiny_llama, prompt, params)
        got = await collect(engine.generate(shard, prompt, params, eos_ids=frozenset()))
        assert got == expected
    metrics = engine.get_metrics()
    assert metrics["drafted_tokens"] > 0
    if draft == "tiny_llama":
        assert metrics["acceptance_rate"] == 1.0
    else:
        assert metrics["acceptance_rate"] < 0.5  # a random draft is rejected almost always


@pytest.mark.parametrize("pipelined", [False, True])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
async def test_same_model_as_draft_accepts_everything(tiny_llama, temperature, pipelined, speculative):
    engine, shard = await speculative(tiny_llama, tiny_llama, draft_tokens=4, adaptive_speculation=False,
                                      acceptance_threshold=0, pipelined=pipelined)
    params = GenerationParams(max_tokens=40, temperature=temperature, seed=3)
    await collect(engine.generate(shard, [1, 2, 3], params, eos_ids=frozenset()))
    metrics = engine.get_metrics()
    assert metrics["drafted_tokens"] >= 20
    assert metrics["acceptance_rate"] == 1.0
    assert metrics["per_position_acceptance"] == [1.0] * 4
    # Pipelining defers the bonus token to the next block, so a block emits K, not K+1.
    assert metrics["mean_accepted_length"] > (3.5 if pipelined else 4.0)


@pytest.mark.heavy
@pytest.mark.parametrize("pipelined", [False, True])
async def test_greedy_identical_on_smollm2_with_early_exit_draft(smollm2_dir, smollm2_early_exit, pipelined, speculative):
    engine, shard = await speculative(smollm2_dir, smollm2_early_exit, draft_tokens=4, pipelined=pipelined)
    tokenizer = engine.tokenizer
    params = GenerationParams(max_tokens=40, temperature=0.0)
    for text in ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]:
        prompt = tokenizer.encode(text)
        expected = await plain_tokens(smollm2_dir, prompt, params)
        got = await collect(engine.generate(shard, prompt, params, eos_ids=frozenset()))
        assert got == expected, (text, tokenizer.decode(got), tokenizer.decode(expected))
    metrics = engine.get_metrics()
    assert 0.0 < metrics["acceptance_rate"] < 1.0


class FailingDraft(MLXInferenceEngine):
    """A real engine whose forward pass starts raising after `fail_after` calls."""

    def __init__(self, fail_after: int):
        super().__init__()
        self.calls, self.fail_after = 0, fail_after

    async def infer_tensor(self, *args, **kwargs):
        self.calls += 1
        if self.calls > self.fail_after:
            raise RuntimeError("draft device lost")
        return await super().infer_tensor(*args, **kwargs)


@pytest.mark.parametrize("pipelined", [False, True])
async def test_draft_failure_mid_request_falls_back_to_plain(make_speculative, tiny_llama, pipelined):
    params = GenerationParams(max_tokens=30, temperature=0.0)
    engine = make_speculative(tiny_llama, draft=FailingDraft(fail_after=5), pipelined=pipelined)
    shard = await engine.full_shard(str(tiny_llama))
    got = await collect(engine.generate(shard, [5, 6, 7], params, eos_ids=frozenset()))
    assert got == await plain_tokens(tiny_llama, [5, 6, 7], params)
    metrics = engine.get_metrics()
    assert metrics["draft_failures"] == 1 and metrics["fallback_steps"] > 0
    assert len(got) == 30


async def test_draft_that_cannot_load_serves_plain_and_retries(make_speculative, tiny_llama, tmp_path):
    params = GenerationParams(max_tokens=10, temperature=0.0)
    engine = make_speculative(tmp_path / "missing")
    shard = await engine.full_shard(str(tiny_llama))
    got = await collect(engine.generate(shard, [5, 6, 7], params, eos_ids=frozenset()))
    assert got == await plain_tokens(tiny_llama, [5, 6, 7], params)
    assert engine.draft_load_failures == 1
    await collect(engine.generate(shard, [5, 6, 7], params, eos_ids=frozenset()))
    assert engine.draft_load_failures == 1  # inside the backoff window: no immediate retry


async def test_incompatible_tokenizer_is_refused(make_speculative, tiny_llama, smollm2_dir):
    engine = make_speculative(tiny_llama)
    shard = await engine.full_shard(str(smollm2_dir))
    with pytest.raises(ConfigError, match="different tokenizers"):
        await engine.ensure_shard(shard)


@pytest.mark.heavy
@pytest.mark.parametrize("pipelined", [False, True])
async def test_joint_distribution_through_engine_matches_target(mlx_engine, joint_pair, pipelined, speculative):
    """Three sampled tokens (top-k 3, T=1) through draft + verify follow the target's joint law."""
    target_dir, draft_dir = joint_pair
    prompt = [10, 20, 30]
    params = dict(temperature=1.0, top_k=3)
    target = mlx_engine()
    expected = await joint_law(target, await target.full_shard(str(target_dir)), prompt, params)
    engine, shard = await speculative(target_dir, draft_dir, draft_tokens=2, adaptive_speculation=False,
                                      acceptance_threshold=0, pipelined=pipelined)
    tv = await sampled_tv(engine, shard, prompt, params, expected, 2000)
    assert len(expected) == 27
    assert tv < 0.08, tv
    assert engine.get_metrics()["drafted_tokens"] > 0
    # Drafts were both accepted and rejected often: the residual rule really decided the
    # rejections (with a verifier resampling from p instead, TV is ~0.13 here).
    assert 0.1 < engine.get_metrics()["acceptance_rate"] < 0.9


@pytest.mark.parametrize("pipelined", [False, True])
async def test_last_block_is_capped_and_metrics_count_what_was_emitted(tiny_llama, pipelined, speculative):
    """max_tokens 7, a same-model draft, K = 4: the second block drafts only what fits."""
    engine, shard = await speculative(tiny_llama, tiny_llama, draft_tokens=4, adaptive_speculation=False,
                                      pipelined=pipelined)
    params = GenerationParams(max_tokens=7, temperature=0.0)
    got = await collect(engine.generate(shard, [1, 2, 3], params, eos_ids=frozenset()))
    assert got == await plain_tokens(tiny_llama, [1, 2, 3], params)
    m = engine.get_metrics()["last_request"]
    assert m["emitted_tokens"] == len(got) == 7
    # Sequential: 4 drafts + bonus, then 1 left: a plain step (K = 0). Pipelined: the bonus is
    # deferred, so 4 drafts, then the 2 that are left. Either way 6 tokens in 2 verifications.
    assert m["k_histogram"] == ({2: 1, 4: 1} if pipelined else {0: 1, 4: 1})
    assert m["steps"] == 2 and m["mean_accepted_length"] == 3.0
    assert m["drafted_tokens"] == m["accepted_tokens"] == (6 if pipelined else 4)


@pytest.mark.parametrize("pipelined", [False, True])
async def test_metrics_stop_at_an_eos_inside_a_block(tiny_llama, pipelined, speculative):
    params = GenerationParams(max_tokens=40, temperature=0.0)
    plain = await plain_tokens(tiny_llama, [1, 2, 3], params)
    width = 4 if pipelined else 5  # tokens a fully accepted K = 4 block emits
    # An EOS whose first occurrence falls strictly inside a block (not on its last token).
    inside = [j for j in range(2, len(plain)) if plain.index(plain[j]) == j and j % width]
    cut = next((j for j in inside if j > width), inside[0])  # past the first block if we can
    eos = plain[cut]
    engine, shard = await speculative(tiny_llama, tiny_llama, draft_tokens=4, adaptive_speculation=False,
                                      pipelined=pipelined)
    got = await collect(engine.generate(shard, [1, 2, 3], params, eos_ids=frozenset({eos})))
    assert got == plain[: cut + 1]
    m = engine.get_metrics()["last_request"]
    blocks = -(-cut // width)
    assert m["emitted_tokens"] == cut + 1 and m["steps"] == blocks
    assert m["mean_accepted_length"] == cut / blocks
    in_last = cut - width * (blocks - 1)  # tokens the last block emitted, EOS included
    full_accepts = 4 * (blocks - 1)
    assert m["accepted_tokens"] == m["drafted_tokens"] == full_accepts + min(4, in_last)
    assert m["per_position_acceptance"] == [1.0] * (4 if blocks > 1 else min(4, in_last))


@pytest.mark.parametrize("pipelined", [False, True])
async def test_fixed_k_drafts_k_every_block_whatever_the_threshold(tiny_llama, tiny_llama_other, pipelined, speculative):
    # A random draft is rarely 99 % sure: adaptive drafting would cut most blocks short.
    engine, shard = await speculative(tiny_llama, tiny_llama_other, draft_tokens=3, adaptive_speculation=False,
                                      acceptance_threshold=0.99, pipelined=pipelined)
    params = GenerationParams(max_tokens=20, temperature=0.0)
    got = await collect(engine.generate(shard, [4, 5, 6], params, eos_ids=frozenset()))
    assert got == await plain_tokens(tiny_llama, [4, 5, 6], params)
    histogram = engine.get_metrics()["last_request"]["k_histogram"]
    short = {k: n for k, n in histogram.items() if k != 3}
    assert histogram.get(3, 0) >= 5, histogram
    # Shorter only where the budget caps a block: each of the last few sizes at most once.
    assert set(short) <= ({1, 2} if pipelined else {0, 1, 2}) and set(short.values()) <= {1}, histogram


async def test_a_model_drafter_serves_one_request(tiny_llama, speculative):
    """The draft cache is the engine's, keyed by request id: a model drafter bound to one
    request refuses another id instead of drafting from (or rolling back) the wrong cache."""
    engine, _ = await speculative(tiny_llama, tiny_llama)
    proposer = make_proposer(engine.config, engine.draft, engine.draft.shard, AdaptiveK(8, 4))
    params, rng = GenerationParams(temperature=0.0), np.random.default_rng(0)
    await proposer.prefill("a", [10, 20, 30])
    with pytest.raises(RuntimeError, match="bound to one request"):
        await proposer.propose("b", [10, 20, 30, 40], 2, params, 0.0, rng)
    with pytest.raises(RuntimeError, match="bound to one request"):
        proposer.accept("b", 3)
    with pytest.raises(RuntimeError, match="bound to one request"):
        proposer.release("b")
    assert (await proposer.propose("a", [10, 20, 30, 40], 2, params, 0.0, rng)).k == 2
    proposer.release("a")
