"""A streamed response whose body a coroutine writes.

Starlette's `StreamingResponse` pulls from an async iterator, which invites a generator that
suspends inside the generation's task groups (PEP 789). Here the producer is a plain
coroutine handed a `write` function; it runs in a task group this response owns, so when the
client goes away or the body ends, its tasks end with the response.
"""

from __future__ import annotations

from typing import Awaitable, Callable

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

Producer = Callable[[Callable[[bytes], Awaitable[None]]], Awaitable[None]]
BUFFERED_CHUNKS = 16  # chunks the producer may run ahead of a slow client


class ProducedStream:
    def __init__(self, produce: Producer, media_type: str):
        self.produce, self.media_type = produce, media_type

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        chunks_send, chunks_recv = anyio.create_memory_object_stream[bytes](BUFFERED_CHUNKS)
        with chunks_recv:
            async with anyio.create_task_group() as group:
                async def run() -> None:
                    async with chunks_send:  # the body ends when the producer returns
                        await self.produce(chunks_send.send)

                group.start_soon(run)
                await StreamingResponse(chunks_recv, media_type=self.media_type)(scope, receive, send)
                group.cancel_scope.cancel()  # the client is gone or the body is complete
