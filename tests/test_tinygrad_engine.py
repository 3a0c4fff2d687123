"""The tinygrad engine against the MLX engine on the same weights.

Parity (logits within a stated tolerance, greedy tokens identical for 32 steps) for prefill,
single-token and multi-token steps after rollbacks at non-zero offsets, interleaved
requests, exact-or-raise trimming, sharded chains equal to the whole model, and speculative
decoding through tinygrad (and mixed MLX/tinygrad pairs) identical to plain greedy decoding.

Engines are module-scoped: tinygrad compiles each kernel shape once per process and
captures one JIT per input bucket per engine, which is most of this file's runtime.
"""

import json
import uuid

import numpy as np
import pytest

from exo.inference.engine import last_only
from exo.inference.generate import GenerationParams, generate_plain
from exo.inference.mlx.engine import MLXInferenceEngine
from exo.inference.shard import Shard
from exo.inference.tinygrad.config import ModelConfig, rope_inverse_frequencies
from exo.inference.tinygrad.engine import TinygradInferenceEngine
from exo.speculative.config import SpeculativeConfig
from exo.speculative.engine import SpeculativeInferenceEngine
from tests.helpers.decoding import collect
from tests.helpers.tiny_models import make_tiny_model

pytestmark = pytest.mark.integration  # tinygrad compiles kernels

# float32 on both sides; differences come from summation order only. Logits of these models
# reach |10|-|30|, so 1e-4 absolute is ~1e-5 relative to their range.
TINY_TOL = dict(rtol=1e-4, atol=1e-4)
# SmolLM2 has 30 layers and larger activations: allow more accumulated rounding.
SMOLLM2_TOL = dict(rtol=1e-3, atol=2e-3)


def n_layers(model_dir) -> int:
    return json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]


@pytest.fixture(scope="module")
def tiny_llama3_rope(tmp_path_factory):
    """A tiny llama whose config asks for llama3 RoPE scaling (as Llama 3.x models do)."""
    path = make_tiny_model(tmp_path_factory.mktemp("tiny-llama3"), "llama", layers=2, seed=5)
    config = json.loads((path / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    (path / "config.json").write_text(json.dumps(config))
    return path


class Pair:
    """A tinygrad and an MLX engine holding the same model, for lock-step comparisons."""

    def __init__(self, model_dir, tol):
        self.model_dir, self.tol = model_dir, tol
        self.shard = Shard.full(str(model_dir), n_layers(model_dir))
        self.tiny, self.mlx = TinygradInferenceEngine(warmup=(1, 2, 4, 8)), MLXInferenceEngine()

    async def step(self, rid: str, tokens: list[int], state=None) -> np.ndarray:
        got, _ = await self.tiny.infer_tensor(rid, self.shard, np.asarray([tokens]), state)
        want, _ = await self.mlx.infer_tensor(rid, self.shard, np.asarray([tokens]), state)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, **self.tol)
        assert self.tiny.cache_offset(rid) == self.mlx.cache_offset(rid)
        return got

    def trim(self, rid: str, n: int) -> None:
        self.tiny.trim_cache(rid, n)
        self.mlx.trim_cache(rid, n)
        assert self.tiny.cache_offset(rid) == self.mlx.cache_offset(rid)

    def close(self) -> None:
        self.tiny.close()
        self.mlx.close()


@pytest.fixture(scope="module")
def pairs(request):
    made: dict[str, Pair] = {}

    def get(name: str) -> Pair:
        if name not in made:
            tol = SMOLLM2_TOL if name == "smollm2_dir" else TINY_TOL
            made[name] = Pair(request.getfixturevalue(name), tol)
        return made[name]

    yield get
    for pair in made.values():
        pair.close()


MODELS = ["tiny_llama", "tiny_qwen2", "tiny_llama3_rope", "smollm2_dir"]


@pytest.mark.parametrize("model", MODELS)
async def test_logits_match_mlx_through_steps_and_rollbacks(pairs, model):
    pair = pairs(model)
    rng = np.random.default_rng(11)
    a, b = uuid.uuid4().hex, uuid.uuid4().hex

    def toks(n):
        return rng.integers(0, 300, size=n).tolist()

    await pair.step(a, toks(9))                      # prefill (a 16-row bucket)
    await pair.step(b, toks(3))                      # a second request, interleaved
    await pair.step(a, toks(1))                      # decode at offset 9
    await pair.step(a, toks(5))                      # a verify-sized block at offset 10
    pair.trim(a, 3)                                  # reject 3: back to offset 12
    await pair.step(a, toks(3))                      # re-run the rolled-back positions
    await pair.step(b, toks(1))
    pair.trim(a, 1)
    await pair.step(a, toks(1))
    if model != "smollm2_dir":  # chunking is the engine's, not the model's: tiny models cover it
        await pair.step(a, toks(70), last_only(4))   # crosses the 64-row chunk; only 4 rows back
        pair.trim(a, 70)
    logits = await pair.step(a, toks(2))
    assert pair.tiny.cache_offset(a) == 17 and logits.shape[:2] == (1, 2)
    for rid in (a, b):
        pair.tiny.free_cache(rid)
        pair.mlx.free_cache(rid)


@pytest.mark.parametrize("model", MODELS)
async def test_greedy_tokens_identical_to_mlx_for_32_steps(pairs, model):
    pair = pairs(model)
    await pair.tiny.ensure_shard(pair.shard)
    await pair.mlx.ensure_shard(pair.shard)
    prompt = (pair.mlx.tokenizer.encode("def quicksort(items):") if model == "smollm2_dir"
              else [3, 14, 15, 92, 65, 35])
    params = GenerationParams(max_tokens=32, temperature=0.0)
    got = [t async for block in generate_plain(pair.tiny, pair.shard, prompt, params) for t in block]
    want = [t async for block in generate_plain(pair.mlx, pair.shard, prompt, params) for t in block]
    assert len(got) == 32
    assert got == want


async def test_trim_is_exact_or_raises(pairs):
    engine, shard = pairs("tiny_llama").tiny, pairs("tiny_llama").shard
    rid = uuid.uuid4().hex
    first, _ = await engine.infer_tensor(rid, shard, np.asarray([[5, 6, 7, 8, 9]]))
    engine.trim_cache(rid, 0)
    assert engine.cache_offset(rid) == 5
    for bad in (6, -1):
        with pytest.raises(ValueError, match="cannot trim"):
            engine.trim_cache(rid, bad)
    assert engine.cache_offset(rid) == 5  # a refused trim changes nothing
    with pytest.raises(ValueError, match="cannot trim"):
        engine.trim_cache("never-seen", 1)
    engine.trim_cache(rid, 5)
    again, _ = await engine.infer_tensor(rid, shard, np.asarray([[5, 6, 7, 8, 9]]))
    np.testing.assert_array_equal(again, first)  # same programs, same inputs: bit-identical
    engine.free_cache(rid)
    assert engine.cache_offset(rid) == 0


async def test_context_overflow_and_bad_inputs_raise(tiny_llama):
    engine = TinygradInferenceEngine(max_context=16, warmup=())
    shard = Shard.full(str(tiny_llama), 4)
    try:
        await engine.infer_tensor("r", shard, np.asarray([list(range(10))]))
        with pytest.raises(ValueError, match="context overflow"):
            await engine.infer_tensor("r", shard, np.asarray([list(range(7))]))
        assert engine.cache_offset("r") == 10  # the refused pass did not advance the pointer
        with pytest.raises(ValueError, match="token ids"):
            await engine.infer_tensor("r", shard, np.zeros((1, 2, 64), dtype=np.float32))
        with pytest.raises(ValueError, match="out of range"):
            await engine.infer_tensor("r", shard, np.asarray([[320]]))
    finally:
        engine.close()


# Splitting is model-independent code; SmolLM2's sharded path is covered on MLX
# (test_mlx_sharding) and through tinygrad's whole-model parity above.
@pytest.mark.parametrize("model_fixture,parts", [("tiny_llama", 3), ("tiny_qwen2", 3), ("tiny_llama3_rope", 2)])
async def test_sharded_chain_equals_whole(request, pairs, model_fixture, parts):
    pair = pairs(model_fixture)
    shards = pair.shard.split(parts)
    engines = [TinygradInferenceEngine(warmup=()) for _ in shards]
    rid = uuid.uuid4().hex
    rng = np.random.default_rng(0)
    try:
        # Prefill, then multi-token and single-token steps, a rollback, and a re-run.
        for length, trim in ((7, 0), (4, 0), (1, 0), (5, 2), (2, 0)):
            tokens = rng.integers(0, 300, size=length).tolist()
            x = np.asarray([tokens])
            for engine, shard in zip(engines, shards):
                x, _ = await engine.infer_tensor(rid, shard, x)
            whole, _ = await pair.tiny.infer_tensor(rid, pair.shard, np.asarray([tokens]))
            assert x.shape == whole.shape == (1, length, whole.shape[-1])
            np.testing.assert_allclose(x, whole, **pair.tol)
            for engine in [*engines, pair.tiny]:
                engine.trim_cache(rid, trim)
            assert [e.cache_offset(rid) for e in engines] == [pair.tiny.cache_offset(rid)] * len(engines)
        middle = engines[1] if parts > 2 else engines[0]
        assert len(middle.model.layers) == middle.shard.get_layer_count()
        assert (middle.model.embedding is None) == (not middle.shard.is_first_layer())
    finally:
        pair.tiny.free_cache(rid)
        for engine in engines:
            engine.close()


PROMPTS = [[10, 20, 30], [104, 101, 108, 108, 111], list(range(40, 72))]


async def test_suffix_drafter_on_tinygrad_is_exact(pairs, tiny_llama):
    """Copies verified by a tinygrad target: output equals plain MLX greedy decoding."""
    pair = pairs("tiny_llama")
    engine = SpeculativeInferenceEngine(pair.tiny, MLXInferenceEngine(), SpeculativeConfig(
        enabled=True, drafter="suffix", adaptive_speculation=False))
    params = GenerationParams(max_tokens=24, temperature=0.0)
    try:
        shard = await engine.full_shard(str(tiny_llama))
        await engine.ensure_shard(shard)
        for prompt in [*PROMPTS, [5, 9, 13, 17, 21] * 5]:
            expected = await collect(generate_plain(pair.mlx, pair.shard, prompt, params))
            assert await collect(engine.generate(shard, prompt, params, eos_ids=frozenset())) == expected
        assert engine.get_metrics()["per_drafter"]["suffix"]["drafted_tokens"] > 0
    finally:
        engine.draft.close()


@pytest.mark.parametrize("target_kind,draft_kind", [("tinygrad", "tinygrad"), ("mlx", "tinygrad"),
                                                    ("tinygrad", "mlx")])
@pytest.mark.parametrize("draft", ["tiny_llama", "tiny_llama_other"])
async def test_speculative_greedy_identical_to_plain(request, pairs, tiny_llama, target_kind, draft_kind, draft):
    """Target and draft engines of either backend: output equals plain MLX greedy decoding."""
    draft_dir = request.getfixturevalue(draft)
    pair = pairs("tiny_llama")
    target = pair.tiny if target_kind == "tinygrad" else MLXInferenceEngine()
    draft_engine = TinygradInferenceEngine(warmup=(1, 2, 4)) if draft_kind == "tinygrad" else MLXInferenceEngine()
    engine = SpeculativeInferenceEngine(target, draft_engine, SpeculativeConfig(
        enabled=True, drafter="model", draft_model=str(draft_dir), draft_tokens=3, adaptive_speculation=False,
        acceptance_threshold=0))
    params = GenerationParams(max_tokens=24, temperature=0.0)
    try:
        shard = await engine.full_shard(str(tiny_llama))
        await engine.ensure_shard(shard)
        for prompt in PROMPTS:
            expected = await collect(generate_plain(pair.mlx, pair.shard, prompt, params))
            got = await collect(engine.generate(shard, prompt, params, eos_ids=frozenset()))
            assert got == expected
        metrics = engine.get_metrics()
        assert metrics["drafted_tokens"] > 0
        if draft == "tiny_llama":
            assert metrics["acceptance_rate"] == 1.0  # same weights on either backend: all accepted
        else:
            assert metrics["acceptance_rate"] < 0.5
    finally:
        draft_engine.close()
        if target is not pair.tiny:
            target.close()


async def test_speculative_on_smollm2_through_tinygrad_with_mlx_draft(pairs, smollm2_early_exit):
    """A real model and a real (weaker) draft: tinygrad target, MLX draft, greedy exact."""
    pair = pairs("smollm2_dir")
    draft = MLXInferenceEngine()
    engine = SpeculativeInferenceEngine(pair.tiny, draft, SpeculativeConfig(
        enabled=True, drafter="model", draft_model=str(smollm2_early_exit), draft_tokens=4))
    try:
        await engine.ensure_shard(pair.shard)
        params = GenerationParams(max_tokens=24, temperature=0.0)
        for text in ["def fibonacci(n):"]:
            prompt = engine.tokenizer.encode(text)
            expected = await collect(generate_plain(pair.mlx, pair.shard, prompt, params))
            got = await collect(engine.generate(shard=pair.shard, prompt=prompt, params=params,
                                                           eos_ids=frozenset()))
            assert got == expected, (text, engine.tokenizer.decode(got), engine.tokenizer.decode(expected))
        assert 0.0 < engine.get_metrics()["acceptance_rate"] < 1.0
    finally:
        draft.close()


def test_rope_scaling_tables():
    base = dict(model_type="llama", hidden_size=64, num_hidden_layers=1, intermediate_size=128,
                num_attention_heads=4, vocab_size=10, rope_theta=10000.0)
    plain = rope_inverse_frequencies(ModelConfig.from_dict(base))
    assert plain.shape == (8,) and plain[0] == 1.0
    linear = rope_inverse_frequencies(ModelConfig.from_dict({**base, "rope_scaling": {"type": "linear",
                                                                                       "factor": 2.0}}))
    np.testing.assert_allclose(linear, plain / 2)
    with pytest.raises(ValueError, match="yarn"):
        rope_inverse_frequencies(ModelConfig.from_dict({**base, "rope_scaling": {"rope_type": "yarn",
                                                                                  "factor": 4.0}}))
    with pytest.raises(ValueError, match="unsupported model_type"):
        ModelConfig.from_dict({**base, "model_type": "gpt2"})


async def test_processes_placement_hosts_tinygrad_and_mixes_engines(pairs, tiny_llama, monkeypatch):
    """`make_engine_pair("processes", "tinygrad", "mlx")`: tinygrad target and MLX draft, each
    in its own pinned process, still give plain greedy output."""
    from exo.inference.placement import make_engine_pair

    monkeypatch.setenv("EXO_TINYGRAD_WARMUP", "1,2,4")  # read by the spawned child; K=3 needs no more

    target, draft = make_engine_pair("processes", "tinygrad", "mlx")
    assert (target.name, draft.name) == ("tinygrad", "mlx")
    engine = SpeculativeInferenceEngine(target, draft, SpeculativeConfig(
        enabled=True, drafter="model", draft_model=str(tiny_llama), draft_tokens=3, adaptive_speculation=False,
        acceptance_threshold=0))
    params = GenerationParams(max_tokens=16, temperature=0.0)
    try:
        shard = await engine.full_shard(str(tiny_llama))
        await engine.ensure_shard(shard)
        expected = await collect(generate_plain(pairs("tiny_llama").mlx, shard, PROMPTS[1], params))
        got = await collect(engine.generate(shard, PROMPTS[1], params, eos_ids=frozenset()))
        assert got == expected
        assert engine.get_metrics()["acceptance_rate"] == 1.0
    finally:
        engine.close()
