"""gRPC transport: a server that maps methods to async handlers, and peer handles.

Messages are opaque bytes (msgpack, in formats the orchestration layer defines), so gRPC
runs with raw-bytes methods and no generated protobuf code. Every call has a deadline. After
a failure the channel reconnects by itself (with backoff); it is never closed while it may
carry other calls, because grpc cancels those with a bare CancelledError, which would look
like a cancellation of their callers. `LinkOptions.delay_s` (+ a uniform random share of
`jitter_s`) delays each message one way: simulated link latency for benchmarks and tests on
one machine; with jitter, messages may overtake each other as on a real network. With a cluster secret, every call
carries an HMAC of itself under the secret (never the secret; see exo/networking/auth.py) and the server
refuses (UNAUTHENTICATED, counted) any call, unary or stream, whose MAC is missing, wrong, stale or replayed.
"""

from __future__ import annotations

import logging
import random
from typing import AsyncIterator, Awaitable, Callable

import anyio
import grpc
import grpc.aio
import msgspec

from exo.networking import auth
from exo.networking.peer_info import PeerInfo

log = logging.getLogger("exo.networking")
SERVICE = "exo.Node"
MAX_MESSAGE_BYTES = 512 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_retries", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
Handler = Callable[[bytes], Awaitable[bytes]]
StreamHandler = Callable[[bytes, Callable[[bytes], Awaitable[None]]], Awaitable[None]]  # (request, send)


class PeerError(RuntimeError):
    """A peer could not be reached or did not answer in time."""


class BadMessage(ValueError):
    """A payload that does not decode or breaks the protocol; the caller gets INVALID_ARGUMENT."""


class LinkOptions(msgspec.Struct, frozen=True):
    """How this node talks to its peers."""

    delay_s: float = 0.0  # simulated one-way latency added to every message
    jitter_s: float = 0.0  # plus uniform(0, jitter_s) per message
    secret: str = ""  # the cluster secret every call proves (by an HMAC; the secret is never sent)

    def __post_init__(self) -> None:
        if self.delay_s < 0 or self.jitter_s < 0:
            raise ValueError(f"link delay and jitter must be >= 0, got {self.delay_s} s and {self.jitter_s} s")


class RPCServer:
    def __init__(self, host: str, port: int, handlers: dict[str, Handler],
                 streams: dict[str, StreamHandler] | None = None, secret: str = "", node_id: str = ""):
        """`node_id`: this node's id, which every call's MAC names (a call made for one member
        cannot be replayed to another)."""
        self.host, self.port, self.handlers = host, port, handlers
        self.node_id = node_id
        self.streams = streams if streams is not None else {}
        self.secret = secret
        self.guard = auth.CallGuard(secret)
        self.rejected = 0
        self.unauthenticated = 0  # calls refused: no, a wrong, a stale or a replayed auth header
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        self._server = grpc.aio.server(options=CHANNEL_OPTIONS)
        methods = {name: grpc.unary_unary_rpc_method_handler(self._wrap(name, handler))
                   for name, handler in self.handlers.items()}
        methods |= {name: grpc.unary_stream_rpc_method_handler(self._wrap_stream(name, handler))
                    for name, handler in self.streams.items()}
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, methods),))
        bound = self._server.add_insecure_port(f"{self.host}:{self.port}")
        if bound == 0:
            raise OSError(f"cannot listen on {self.host}:{self.port} (port in use?)")
        self.port = bound
        await self._server.start()

    async def stop(self, grace_s: float = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None

    async def _refuse_strangers(self, name: str, request: bytes, context: grpc.aio.ServicerContext) -> None:
        """Abort the call unless its auth header is this call's, fresh and new: the MAC covers the
        request bytes, so it is checked before the handler reads them."""
        why = self.guard.refusal(auth.addressed(self.node_id, name), request, context.invocation_metadata())
        if why is None:
            return
        self.unauthenticated += 1
        level = logging.WARNING if self.unauthenticated == 1 or self.unauthenticated % 100 == 0 else logging.DEBUG
        log.log(level, "refused %s call from %s: %s (%d so far)", name, context.peer(), why, self.unauthenticated)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "this node needs the cluster secret")

    def _wrap(self, name: str, handler: Handler):
        async def serve(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            await self._refuse_strangers(name, request, context)
            try:
                return await handler(request)
            except BadMessage as exc:
                self.rejected += 1
                log.warning("rejected %s message (%d so far): %s", name, self.rejected, exc)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except Exception as exc:  # the peer gets the reason; this node keeps serving
                log.exception("%s handler failed", name)
                await context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        return serve


    def _wrap_stream(self, name: str, handler: StreamHandler):
        async def serve(request: bytes, context: grpc.aio.ServicerContext) -> None:
            """A coroutine, not a generator: the handler writes each message itself, so its
            task groups close inside it rather than across a suspended generator."""
            await self._refuse_strangers(name, request, context)
            try:
                await handler(request, context.write)
            except BadMessage as exc:
                self.rejected += 1
                log.warning("rejected %s message (%d so far): %s", name, self.rejected, exc)
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return serve


class PeerHandle:
    """A connection to one peer; reconnects after failures."""

    def __init__(self, info: PeerInfo, link: LinkOptions = LinkOptions()):
        self.info = info
        self.link = link
        self._random = random.Random()
        self._channel: grpc.aio.Channel | None = None

    @property
    def id(self) -> str:
        return self.info.node_id

    @property
    def address(self) -> str:
        return f"{self.info.host}:{self.info.port}"

    async def _delay(self) -> None:
        seconds = self.link.delay_s + (self._random.uniform(0, self.link.jitter_s) if self.link.jitter_s else 0.0)
        if seconds:
            await anyio.sleep(seconds)

    async def call(self, method: str, payload: bytes, timeout_s: float) -> bytes:
        await self._delay()
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        stub = self._channel.unary_unary(f"/{SERVICE}/{method}")
        metadata = auth.call_metadata(self.link.secret, auth.addressed(self.id, method), payload)
        try:
            return await stub(payload, timeout=timeout_s, metadata=metadata, wait_for_ready=False)
        except grpc.aio.AioRpcError as exc:
            raise PeerError(f"{method} to node {self.id} at {self.address} failed: "
                            f"{exc.code().name}: {exc.details()}") from None

    async def stream(self, method: str, payload: bytes, idle_timeout_s: float) -> AsyncIterator[bytes]:
        """Messages of a server stream; fails if the peer goes silent for `idle_timeout_s`.
        Closing the iterator early cancels the call (the peer stops its work)."""
        await self._delay()
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        metadata = auth.call_metadata(self.link.secret, auth.addressed(self.id, method), payload)
        call = self._channel.unary_stream(f"/{SERVICE}/{method}")(payload, metadata=metadata, wait_for_ready=False)
        try:
            while True:
                with anyio.move_on_after(idle_timeout_s) as scope:
                    message = await call.read()
                if scope.cancelled_caught:
                    raise PeerError(f"{method} stream from node {self.id} at {self.address}: "
                                    f"nothing for {idle_timeout_s:.0f} s")
                if message is grpc.aio.EOF:
                    return
                yield message
        except grpc.aio.AioRpcError as exc:
            raise PeerError(f"{method} stream from node {self.id} at {self.address} failed: "
                            f"{exc.code().name}: {exc.details()}") from None
        finally:
            call.cancel()

    async def close(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            try:
                await channel.close(grace=None)
            except Exception as exc:  # a broken channel is dropped either way; the next call reconnects
                log.warning("closing the channel to node %s failed: %s", self.id, exc)
