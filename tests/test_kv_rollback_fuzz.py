"""Random extend/rollback sequences leave caches exactly where plain decoding would be."""

import numpy as np
import pytest

from exo.inference.shard import Shard
from exo.speculative.kv import KVRollbackError, rollback_to


@pytest.mark.parametrize("parts", [1, 2])
async def test_random_accept_reject_sequences(mlx_engine, tiny_llama, parts):
    whole = Shard.full(str(tiny_llama), 4)
    shards = whole.split(parts)
    engines = [mlx_engine() for _ in shards]
    fresh = mlx_engine()
    rng = np.random.default_rng(11)
    sequence: list[int] = []
    for step in range(40):
        block = rng.integers(0, 300, size=int(rng.integers(1, 7))).tolist()
        x = np.asarray([block])
        for engine, shard in zip(engines, shards):
            x, _ = await engine.infer_tensor("fuzz", shard, x)
        sequence += block
        # Keep a random prefix of the block, as a verification with rejections would.
        keep = len(sequence) - len(block) + int(rng.integers(0, len(block) + 1))
        for engine in engines:
            rollback_to(engine, "fuzz", keep)
        sequence = sequence[:keep]
        if step % 8 == 7 and sequence:
            probe = int(rng.integers(0, 300))
            x = np.asarray([[probe]])
            for engine, shard in zip(engines, shards):
                x, _ = await engine.infer_tensor("fuzz", shard, x)
            reference, _ = await fresh.infer_tensor(f"fresh{step}", whole, np.asarray([sequence + [probe]]))
            np.testing.assert_allclose(x[0, -1], reference[0, -1], rtol=1e-4, atol=1e-4)
            for engine in engines:
                rollback_to(engine, "fuzz", len(sequence))
        assert all(engine.cache_offset("fuzz") == len(sequence) for engine in engines)


async def test_rollback_beyond_cache_raises(mlx_engine, tiny_llama):
    engine = mlx_engine()
    shard = Shard.full(str(tiny_llama), 4)
    await engine.infer_tensor("r", shard, np.asarray([[1, 2, 3]]))
    with pytest.raises(KVRollbackError):
        rollback_to(engine, "r", 4)
    assert rollback_to(engine, "r", 1) == 2
