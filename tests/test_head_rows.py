"""A draft with a restricted output head (FR-Spec-style): same logits on its rows, exact output."""

import numpy as np
import pytest

from exo.inference.engine import HEAD_ROWS, last_only
from exo.inference.generate import GenerationParams
from exo.inference.head_rows import HeadRows
from exo.inference.sampling import warp
from exo.speculative.drafters import make_proposer
from exo.speculative.drafters.model import ModelDrafter
from tests.helpers.decoding import collect, plain_tokens
from tests.helpers.laws import joint_law, sampled_tv


def test_ranked_rows_are_the_lowest_ids_plus_the_special_ones():
    rows = HeadRows.ranked(100, 257, always=[256, 5, 256, 400])
    assert rows == HeadRows(100, (256,))  # 5 is already in, 400 is past the vocabulary
    assert rows.size == 101 and rows.ids().tolist() == [*range(100), 256]
    assert HeadRows.ranked(1000, 257) == HeadRows(257)
    with pytest.raises(ValueError):
        HeadRows.ranked(0, 257)


def test_rows_map_back_to_token_ids_and_distributions():
    rows = HeadRows(3, (7, 9))
    logits = np.arange(12.0)[None]
    assert rows.select(logits).tolist() == [[0, 1, 2, 7, 9]]
    assert [rows.token(i) for i in range(5)] == [0, 1, 2, 7, 9]
    probs = np.array([0.1, 0.2, 0.3, 0.15, 0.25])
    wide = rows.widen(probs)
    assert wide.shape == (10,) and wide.sum() == pytest.approx(1.0)
    assert wide[[0, 1, 2, 7, 9]].tolist() == probs.tolist() and wide[[3, 4, 5, 6, 8]].sum() == 0
    assert HeadRows.of({"first": 3, "extra": [7, 9]}) == rows  # as it arrives over a pipe


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_qwen2"])  # tied and untied heads
async def test_restricted_head_gives_the_full_heads_logits_on_its_rows(request, mlx_engine, model):
    model_dir = request.getfixturevalue(model)
    engine = mlx_engine()
    shard = await engine.full_shard(str(model_dir))
    rows = HeadRows(50, (256, 300))
    prompt = np.asarray([[3, 14, 15, 92, 65]])
    full, _ = await engine.infer_tensor("full", shard, prompt)
    part, _ = await engine.infer_tensor("part", shard, prompt, {HEAD_ROWS: rows})
    assert part.shape == (1, 5, 52)
    np.testing.assert_allclose(part, rows.select(full), rtol=1e-5, atol=1e-5)
    # The gathered head is kept for the next call and replaced for another subset.
    step, _ = await engine.infer_tensor("part", shard, np.asarray([[7]]), last_only() | {HEAD_ROWS: HeadRows(20)})
    assert step.shape == (1, 1, 20)


async def test_draft_vocab_builds_a_restricted_model_drafter(make_speculative, tiny_llama):
    engine = make_speculative(tiny_llama, draft_vocab=100)
    shard = await engine.full_shard(str(tiny_llama))
    await engine.ensure_shard(shard)
    await engine.draft.ensure_shard(await engine.draft.full_shard(str(tiny_llama)))
    proposer = make_proposer(engine.config, engine.draft, engine.draft.shard, None)
    assert isinstance(proposer, ModelDrafter)
    assert proposer.head_rows == HeadRows(100, (256,))  # the end-of-text token is always a row


@pytest.mark.parametrize("pipelined", [False, True])
async def test_greedy_with_a_restricted_draft_head_is_identical_to_plain(make_speculative, tiny_llama, pipelined):
    """The target drafting for itself through a 100-row head: its argmax is often outside the
    rows, so drafts are rejected there, and the output is still plain decoding's."""
    engine = make_speculative(tiny_llama, draft_vocab=100, draft_tokens=4, adaptive_speculation=False,
                              acceptance_threshold=0, pipelined=pipelined)
    shard = await engine.full_shard(str(tiny_llama))
    params = GenerationParams(max_tokens=24, temperature=0.0)
    for prompt in ([10, 20, 30], list(range(40, 72)), [7]):
        got = await collect(engine.generate(shard, prompt, params, eos_ids=frozenset()))
        assert got == await plain_tokens(tiny_llama, prompt, params)
    metrics = engine.get_metrics()
    assert metrics["drafted_tokens"] > 20
    assert 0.0 < metrics["acceptance_rate"] < 1.0  # the same model, losing only outside the rows


class FullHeadReported(ModelDrafter):
    """Wrong on purpose: samples from the restricted head but tells the verifier the full
    head's distribution, as if the rows were the whole vocabulary."""

    async def _step(self, request_id, tokens):
        state = {k: v for k, v in self._state.items() if k != HEAD_ROWS}
        logits, _ = await self.engine.infer_tensor(request_id, self.shard, np.asarray([tokens]), state)
        self._full_row = logits.reshape(-1, logits.shape[-1])[-1]
        return self.head_rows.select(self._full_row)

    def _draw(self, row, params, rng):
        token, _ = super()._draw(row, params, rng)
        return token, warp(self._full_row, params.temperature, params.top_k, params.top_p)


@pytest.mark.heavy
@pytest.mark.parametrize("rows,wrong", [(140, False), (100, False), (100, True)])
async def test_sampled_output_with_a_restricted_draft_head_follows_the_target(
        monkeypatch, mlx_engine, make_speculative, joint_pair, rows, wrong):
    """T = 1, top-k 5, top-p 0.9: three sampled tokens through a restricted draft head follow
    the target's joint law. With 140 rows the draft keeps most of its mass and ~37 % of its
    drafts are accepted (the accept test decides); with 100 rows it loses its favourite
    tokens, ~2 % are accepted and the residual decides, and there reporting the full head's
    distribution instead is far off (TV 0.21 measured against 0.05)."""
    import exo.speculative.drafters as drafters

    target_dir, draft_dir = joint_pair
    prompt = [10, 20, 30]
    params = dict(temperature=1.0, top_k=5, top_p=0.9)
    target = mlx_engine()
    expected = await joint_law(target, await target.full_shard(str(target_dir)), prompt, params)
    if wrong:
        monkeypatch.setattr(drafters.model, "ModelDrafter", FullHeadReported)
    engine = make_speculative(draft_dir, draft_vocab=rows, draft_tokens=2, adaptive_speculation=False,
                              acceptance_threshold=0)
    shard = await engine.full_shard(str(target_dir))
    tv = await sampled_tv(engine, shard, prompt, params, expected, 2000)
    acceptance = engine.get_metrics()["acceptance_rate"]
    assert engine.get_metrics()["drafted_tokens"] > 0
    if wrong:
        assert tv > 0.12, tv
    else:
        assert tv < 0.08, tv
        assert acceptance > (0.2 if rows == 140 else 0.005), acceptance
