"""Events: msgpack round trip, validation, a bus that never blocks publishers."""

import anyio
import pytest

from exo.inference.generate import GenerationParams
from exo.speculative.events import (
    BlockVerified, EventBus, EventCodec, KVRollback, MetricsUpdate, SpeculationFallback,
)
from tests.helpers.decoding import collect


@pytest.mark.parametrize("event", [
    KVRollback(request_id="r1", shard="m:0-3", keep_tokens=17, node_id="a", timestamp=1.5),
    BlockVerified(request_id="r1", block=3, drafted=4, accepted=2, emitted=3, verify_seconds=0.25),
    MetricsUpdate(request_id="r2", acceptance_rate=0.5, per_position_acceptance=[0.9, 0.4]),
    SpeculationFallback(request_id="r3", reason="draft failed"),
])
def test_round_trip(event):
    codec = EventCodec()
    assert codec.decode(codec.encode(event)) == event


def test_malformed_payloads_are_dropped_and_counted():
    codec = EventCodec()
    good = codec.encode(KVRollback(request_id="r", keep_tokens=3))
    bad = [b"", b"\xc1", good[:-3], codec.encode({"type": "nope", "request_id": "r"}),
           codec.encode({"type": "kv_rollback", "request_id": 5}),
           codec.encode({"type": "kv_rollback", "request_id": "r", "version": 99})]
    assert [codec.decode(payload) for payload in bad] == [None] * len(bad)
    assert codec.rejected == len(bad)


async def test_slow_subscriber_never_blocks_and_counts_drops():
    bus = EventBus(capacity=4)
    with bus.subscribe() as slow:
        for i in range(10):
            bus.publish(KVRollback(request_id="r", keep_tokens=i))  # no await: never blocks
        assert slow.dropped == 6
        received = []
        async for event in slow:
            received.append(event.keep_tokens)
            if len(received) == 4:
                break
        assert received == [6, 7, 8, 9]


async def test_generation_publishes_metrics_while_subscriber_sleeps(make_speculative, tiny_llama):
    bus = EventBus(capacity=8)
    engine = make_speculative(tiny_llama, pipelined=True, events=bus)
    shard = await engine.full_shard(str(tiny_llama))
    updates = []

    async def watch(subscription):
        async for event in subscription:
            if isinstance(event, MetricsUpdate):
                updates.append(event)

    with bus.subscribe() as never_read, bus.subscribe(lambda e: isinstance(e, MetricsUpdate)) as metrics:
        async with anyio.create_task_group() as group:
            group.start_soon(watch, metrics)
            await collect(engine.generate(shard, [1, 2, 3], GenerationParams(max_tokens=60), eos_ids=frozenset()))
            await anyio.sleep(0.05)
            group.cancel_scope.cancel()
        assert never_read.dropped > 0  # it fell behind; generation did not wait for it
    assert updates and updates[-1].emitted_tokens >= 50
    assert updates[-1].acceptance_rate == 1.0
