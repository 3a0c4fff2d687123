"""A model run as consecutive layer-range shards equals the whole model."""

import json
import uuid

import numpy as np
import pytest

from exo.inference.shard import Shard


def n_layers(model_dir) -> int:
    return json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]


async def run_chain(engines, shards, request_id, tokens):
    x = np.asarray([tokens])
    for engine, shard in zip(engines, shards):
        x, _ = await engine.infer_tensor(request_id, shard, x)
    return x


@pytest.mark.parametrize("model_fixture,parts", [("tiny_llama", 2), ("tiny_llama", 3), ("tiny_qwen2", 3),
                                                 ("smollm2_dir", 3)])
async def test_sharded_equals_whole(mlx_engine, request, model_fixture, parts):
    model_dir = request.getfixturevalue(model_fixture)
    whole = Shard.full(str(model_dir), n_layers(model_dir))
    shards = whole.split(parts)
    reference = mlx_engine()
    engines = [mlx_engine() for _ in shards]
    rid = uuid.uuid4().hex
    rng = np.random.default_rng(0)
    vocab = 300
    # Prefill, then multi-token and single-token steps at growing non-zero offsets.
    for length in (7, 4, 1, 5):
        tokens = rng.integers(0, vocab, size=length).tolist()
        expected, _ = await reference.infer_tensor(rid, whole, np.asarray([tokens]))
        got = await run_chain(engines, shards, rid, tokens)
        assert got.shape == expected.shape == (1, length, expected.shape[-1])
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
        assert [e.cache_offset(rid) for e in engines] == [reference.cache_offset(rid)] * len(engines)


async def test_shard_loads_only_its_layers(mlx_engine, tiny_llama):
    engine = mlx_engine()
    middle = Shard(str(tiny_llama), 1, 2, 4)
    await engine.ensure_shard(middle)
    assert len(engine.model.layers) == 2
    assert not hasattr(engine.model, "embed_tokens") and not hasattr(engine.model, "norm")
    hidden, _ = await engine.infer_tensor("r", middle, np.zeros((1, 3, 64), dtype=np.float32))
    assert hidden.shape == (1, 3, 64)
    with pytest.raises(ValueError, match="hidden states"):
        await engine.infer_tensor("r", middle, np.zeros((1, 3), dtype=np.int64))


def test_bad_shards_are_refused():
    with pytest.raises(ValueError):
        Shard("m", 3, 2, 4)
    with pytest.raises(ValueError):
        Shard("m", 0, 4, 4)
