"""msgpack encoding of events; decoding validates and counts what it rejects."""

from __future__ import annotations

import logging

import msgspec

from exo.speculative.events.types import EVENT_VERSION, Event

log = logging.getLogger("exo.events")


class EventCodec:
    def __init__(self) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(Event)
        self.rejected = 0

    def encode(self, event: Event) -> bytes:
        return self._encoder.encode(event)

    def decode(self, payload: bytes) -> Event | None:
        """The event, or None (counted, logged) for malformed, unknown or future-version bytes."""
        try:
            event = self._decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.rejected += 1
            log.warning("dropped malformed event (%d so far): %s", self.rejected, exc)
            return None
        if event.version > EVENT_VERSION:
            self.rejected += 1
            log.warning("dropped event of unsupported version %d", event.version)
            return None
        return event
