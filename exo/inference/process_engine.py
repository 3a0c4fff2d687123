"""An engine in its own process, optionally pinned to CPUs with its own BLAS thread count.

Two engines in two threads of one process share the cores and the memory bandwidth, so a
draft and a target never truly run at the same time on a small CPU. Giving each its own
process and core is the single-machine form of "the draft runs on another device": it is
what makes pipelined speculation overlap for real. Calls travel over a pipe as msgpack
headers plus raw array bytes.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import anyio
import msgspec
import numpy as np

from exo.inference.backends import check_engine_name, make_engine
from exo.inference.engine import InferenceEngine
from exo.inference.shard import Shard
from exo.inference.tensor_bytes import TensorBytes

log = logging.getLogger("exo.process_engine")


class Call(msgspec.Struct, frozen=True):
    op: str  # load | infer | trim | free | close
    request_id: str = ""
    shard: tuple[str, int, int, int] | None = None
    model_dir: str = ""
    array: TensorBytes | None = None
    state: dict[str, Any] | None = None
    n: int = 0  # trim: tokens to drop; load: cache table capacity (0: the engine's default)


class Reply(msgspec.Struct, frozen=True):
    error: str = ""
    array: TensorBytes | None = None
    offset: int = 0


class EngineProcessError(RuntimeError):
    pass


class ProcessInferenceEngine(InferenceEngine):
    def __init__(self, cpus: Sequence[int] | None = None, blas_threads: int | None = 1, *,
                 model_dir_for: Callable[[str], Path] | None = None, call_timeout: float = 600.0,
                 engine: str = "mlx"):
        """`engine` names the backend the child process hosts (see `backends.ENGINES`)."""
        self.name = check_engine_name(engine)
        if model_dir_for is None:
            from exo.inference.sources import model_dir_for as default_resolver
            model_dir_for = default_resolver
        self.model_dir_for = model_dir_for
        self.cpus, self.blas_threads, self.call_timeout = list(cpus or []), blas_threads, call_timeout
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn = None
        self._lock = anyio.Lock()
        self._offsets: dict[str, int] = {}
        self._cache_capacity = 0  # 0: the child engine's default; sent with every load
        self._encoder, self._decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(Reply)
        self.shard: Shard | None = None
        self.tokenizer = None

    def _start(self) -> None:
        if self._process is not None and self._process.is_alive():
            return
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, self.cpus, self.blas_threads, self.name),
                                        daemon=True, name="exo-engine")
        self._process.start()
        child.close()

    async def _call(self, call: Call) -> Reply:
        """Only a load may start the process: any other call reaching a fresh child (the old
        one died while this call waited for the lock) would find no model and no caches."""
        async with self._lock:
            if call.op == "load":
                await anyio.to_thread.run_sync(self._start)  # spawning blocks; keep it off the loop
            elif self._process is None or not self._process.is_alive():
                self._kill()
                raise EngineProcessError(f"engine process died before {call.op}; load the model again")
            return await anyio.to_thread.run_sync(self._roundtrip, call)

    def _sync_call(self, call: Call) -> Reply:
        """A quick cache operation on the event loop's thread; never restarts the process,
        whose KV caches would be gone."""
        if self._lock.locked():
            raise RuntimeError("engine process is busy; cache operations must not overlap a forward pass")
        if self._process is None or not self._process.is_alive():
            raise EngineProcessError(f"engine process is not running; cannot {call.op}")
        return self._roundtrip(call)

    def _roundtrip(self, call: Call) -> Reply:
        try:
            self._conn.send_bytes(self._encoder.encode(call))
            if not self._conn.poll(self.call_timeout):
                self._kill()
                raise EngineProcessError(f"engine process did not answer within {self.call_timeout:.0f} s")
            reply = self._decoder.decode(self._conn.recv_bytes())
        except (EOFError, OSError, BrokenPipeError) as exc:
            self._kill()
            raise EngineProcessError(f"engine process died: {exc}") from exc
        if reply.error:
            raise EngineProcessError(f"engine process failed on {call.op}: {reply.error}")
        return reply

    def _kill(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join(5)
        self._process = None
        self._offsets.clear()
        self.shard = None

    async def ensure_shard(self, shard: Shard) -> None:
        if self.shard == shard and self._process is not None and self._process.is_alive():
            return
        model_dir = await anyio.to_thread.run_sync(self.model_dir_for, shard.model_id)
        await self.load_checkpoint(shard, str(model_dir))

    async def load_checkpoint(self, shard: Shard, path: str) -> None:
        from exo.inference.tokenizer import load_tokenizer

        await self._call(Call("load", shard=_wire(shard), model_dir=str(path), n=self._cache_capacity))
        self.tokenizer = await anyio.to_thread.run_sync(load_tokenizer, Path(path))
        self.shard = shard
        self._offsets.clear()

    async def infer_tensor(self, request_id: str, shard: Shard, input_data: np.ndarray,
                           inference_state: dict | None = None) -> tuple[np.ndarray, dict | None]:
        if self._offsets.get(request_id) and not (self._process is not None and self._process.is_alive()):
            self._kill()
            raise EngineProcessError(f"engine process died; the KV cache of request {request_id!r} is lost")
        await self.ensure_shard(shard)
        # The child checks the shard: a reload by another call meanwhile fails this one loudly.
        reply = await self._call(Call("infer", request_id, shard=_wire(shard),
                                      array=TensorBytes.of(np.asarray(input_data)), state=inference_state))
        self._offsets[request_id] = reply.offset
        return reply.array.array(), inference_state

    def cache_offset(self, request_id: str) -> int:
        return self._offsets.get(request_id, 0)

    def trim_cache(self, request_id: str, n_tokens: int) -> None:
        """Synchronous by interface; the pipe is strictly request/reply, so this is safe."""
        held = self._offsets.get(request_id, 0)
        if n_tokens < 0 or n_tokens > held:
            raise ValueError(f"cannot trim {n_tokens} tokens from request {request_id!r} holding {held}")
        self._offsets[request_id] = self._sync_call(Call("trim", request_id, n=n_tokens)).offset

    def set_cache_policy(self, capacity: int, is_live: Callable[[str], bool] | None = None) -> None:
        """The child gets the capacity (with the next load); `is_live` cannot cross the pipe,
        so there every cache counts as live and requests leave only through `free_cache`."""
        self._cache_capacity = capacity

    def free_cache(self, request_id: str) -> None:
        self._offsets.pop(request_id, None)
        if self._process is not None and self._process.is_alive():
            self._sync_call(Call("free", request_id))

    def close(self) -> None:
        if self._process is None:
            return
        try:
            if self._process.is_alive():
                self._conn.send_bytes(self._encoder.encode(Call("close")))
                self._process.join(10)
        except (OSError, BrokenPipeError):
            pass  # already gone; kill below makes sure
        self._kill()


def _wire(shard: Shard) -> tuple[str, int, int, int]:
    return shard.model_id, shard.start_layer, shard.end_layer, shard.n_layers


def _serve(conn, cpus: list[int], blas_threads: int | None, engine_name: str = "mlx") -> None:
    """Child process: configure threads and affinity before the backend loads, then serve calls."""
    if blas_threads:
        for name in ("OPENBLAS_NUM_THREADS", "BLIS_NUM_THREADS", "OMP_NUM_THREADS"):
            os.environ[name] = str(blas_threads)
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)
    if cpus and engine_name == "tinygrad":
        os.environ.setdefault("NUM_CPU_THREADS", str(len(cpus)))  # tinygrad CPU threads follow the pinning
    import exo  # noqa: F401  (BLAS selection, before mlx.core)
    anyio.run(_serve_loop, conn, make_engine(engine_name))


async def _serve_loop(conn, engine) -> None:
    encoder, decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(Call)
    shard: Shard | None = None
    while True:
        try:
            call = decoder.decode(await anyio.to_thread.run_sync(conn.recv_bytes))
        except EOFError:
            break
        reply = Reply()
        try:
            if call.op == "close":
                conn.send_bytes(encoder.encode(reply))
                break
            if call.op == "load":
                shard = Shard(*call.shard)
                if call.n:
                    engine.set_cache_policy(call.n)
                await engine.load_checkpoint(shard, call.model_dir)
            elif call.op == "infer":
                if shard is None:
                    raise RuntimeError("no model loaded in this engine process")
                if call.shard is not None and Shard(*call.shard) != shard:
                    raise RuntimeError(f"a call for {Shard(*call.shard)} reached a process holding {shard}")
                out, _ = await engine.infer_tensor(call.request_id, shard, call.array.array(), call.state)
                reply = Reply(array=TensorBytes.of(out), offset=engine.cache_offset(call.request_id))
            elif call.op == "trim":
                engine.trim_cache(call.request_id, call.n)
                reply = Reply(offset=engine.cache_offset(call.request_id))
            elif call.op == "free":
                engine.free_cache(call.request_id)
            else:
                reply = Reply(error=f"unknown op {call.op!r}")
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
            log.exception("engine process: %s failed", call.op)
            reply = Reply(error=f"{type(exc).__name__}: {exc}")
        conn.send_bytes(encoder.encode(reply))
    engine.close()
