"""KV caches: incremental decoding equals one forward pass; trimming is exact or raises."""

import json
import uuid

import numpy as np
import pytest

from exo.inference.shard import Shard


@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_qwen2", "smollm2_dir"])
async def test_token_by_token_equals_whole_sequence(mlx_engine, request, model_fixture):
    model_dir = request.getfixturevalue(model_fixture)
    shard = Shard.full(str(model_dir), json.loads((model_dir / "config.json").read_text())["num_hidden_layers"])
    engine = mlx_engine()
    tokens = np.random.default_rng(3).integers(0, 300, size=12).tolist()
    whole, _ = await engine.infer_tensor("whole", shard, np.asarray([tokens]))
    steps = [(await engine.infer_tensor("steps", shard, np.asarray([[t]])))[0][0, -1] for t in tokens]
    np.testing.assert_allclose(np.stack(steps), whole[0], rtol=1e-4, atol=1e-4)
    assert engine.cache_offset("steps") == engine.cache_offset("whole") == len(tokens)


async def test_trim_then_continue_matches_fresh(mlx_engine, tiny_llama):
    shard = Shard.full(str(tiny_llama), 4)
    engine = mlx_engine()
    rid = uuid.uuid4().hex
    await engine.infer_tensor(rid, shard, np.asarray([[5, 6, 7, 8, 9]]))
    engine.trim_cache(rid, 3)
    assert engine.cache_offset(rid) == 2
    after_trim, _ = await engine.infer_tensor(rid, shard, np.asarray([[40, 41]]))
    fresh, _ = await engine.infer_tensor("fresh", shard, np.asarray([[5, 6, 40, 41]]))
    np.testing.assert_allclose(after_trim[0], fresh[0, 2:], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="cannot trim"):
        engine.trim_cache(rid, 99)
    engine.free_cache(rid)
    assert engine.cache_offset(rid) == 0
