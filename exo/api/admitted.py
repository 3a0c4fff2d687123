"""A streamed response that waits for an admission slot before it sends its status line.

A stream's 200 goes out with its first byte, so a request that is refused or times out in the
admission queue must be answered before that: this ASGI response holds the node's slot for
the whole stream, sends the refusal (429 + Retry-After) instead when there is none, and
leaves the queue quietly if the client disconnects while waiting.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager, AsyncExitStack
from typing import Callable

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from exo.orchestration.admission import AdmissionRejected


class AdmittedResponse:
    def __init__(self, admit: Callable[[], AbstractAsyncContextManager], inner: Response,
                 refused: Callable[[AdmissionRejected], Response]):
        self.admit, self.inner, self.refused = admit, inner, refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with AsyncExitStack() as stack:
            try:
                admitted = await self._enter(stack, receive)
            except AdmissionRejected as exc:
                await self.refused(exc)(scope, receive, send)
                return
            if admitted:
                await self.inner(scope, receive, send)

    async def _enter(self, stack: AsyncExitStack, receive: Receive) -> bool:
        """Take the slot into `stack`; False if the client went away first."""
        gone, error = False, None

        async def watch(scope: anyio.CancelScope) -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            scope.cancel()

        async with anyio.create_task_group() as group:
            group.start_soon(watch, group.cancel_scope)
            try:
                await stack.enter_async_context(self.admit())
            except AdmissionRejected as exc:  # re-raised below, outside the task group (no ExceptionGroup)
                error = exc
            group.cancel_scope.cancel()
        if error is not None:
            raise error
        return not gone
