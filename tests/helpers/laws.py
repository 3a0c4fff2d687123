"""Exact sampling laws of a target and their distance from what an engine samples."""

from __future__ import annotations

import anyio
import numpy as np

from exo.inference.generate import GenerationParams
from exo.inference.sampling import warp
from tests.helpers.decoding import collect


async def joint_law(target, shard, prompt: list[int], params: dict) -> dict[tuple[int, int, int], float]:
    """The target's exact law of the next three tokens under `params` (temperature, top-k,
    top-p), enumerated over the warped support: use a small support (top-k 3: 27 outcomes)."""
    async def dist(prefix):
        logits, _ = await target.infer_tensor("law", shard, np.asarray([prefix]))
        target.free_cache("law")
        return warp(logits[0, -1], **params)

    law = {}
    p1 = await dist(prompt)
    for a in np.flatnonzero(p1):
        p2 = await dist(prompt + [int(a)])
        for b in np.flatnonzero(p2):
            p3 = await dist(prompt + [int(a), int(b)])
            for c in np.flatnonzero(p3):
                law[(int(a), int(b), int(c))] = p1[a] * p2[b] * p3[c]
    return law


async def sampled_tv(engine, shard, prompt: list[int], params: dict, law: dict, trials: int) -> float:
    """Total variation between `law` and three tokens from `trials` seeded requests (seeds
    0..trials-1, 8 at a time to keep both engines' threads busy); mass outside `law` counts whole."""
    counts: dict[tuple[int, ...], int] = {}
    limiter = anyio.CapacityLimiter(8)

    async def one(seed):
        async with limiter:
            out = await collect(engine.generate(shard, prompt, GenerationParams(max_tokens=3, seed=seed, **params),
                                                eos_ids=frozenset()))
        counts[tuple(out)] = counts.get(tuple(out), 0) + 1

    async with anyio.create_task_group() as group:
        for seed in range(trials):
            group.start_soon(one, seed)
    outside = sum(n for key, n in counts.items() if key not in law)
    return 0.5 * (sum(abs(counts.get(key, 0) / trials - p) for key, p in law.items()) + outside / trials)
