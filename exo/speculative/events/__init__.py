"""Speculative events: msgspec types, a msgpack codec, an in-node bus."""

from exo.speculative.events.bus import EventBus
from exo.speculative.events.codec import EventCodec
from exo.speculative.events.types import (
    BlockVerified, DraftProposed, Event, KVRollback, MetricsUpdate, SpeculationFallback, StageReport, EVENT_VERSION,
)

__all__ = ["EventBus", "EventCodec", "Event", "BlockVerified", "DraftProposed", "KVRollback",
           "MetricsUpdate", "SpeculationFallback", "StageReport", "EVENT_VERSION"]
