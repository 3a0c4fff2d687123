"""What travels between nodes: msgspec structs encoded as msgpack, tensors as raw bytes.

Every message is versioned through its struct layout only: decoding validates types, and a
payload that does not decode is rejected (and counted) by the receiver. These formats belong
to the orchestration layer that speaks them; the transport (`exo.networking`) only moves the
encoded bytes.
"""

from __future__ import annotations

import msgspec
import numpy as np

from exo.inference.generate import GenerationParams
from exo.inference.logprobs import TokenLogprob
from exo.inference.tensor_bytes import TensorBytes
from exo.networking.peer_info import PeerInfo
from exo.speculative.config import SpeculativeConfig
from exo.speculative.events import StageReport
from exo.speculative.metrics import MetricsSnapshot
from exo.topology.partitioning import Stage

WIRE_VERSION = 2  # 2: blocks carry an epoch; rollbacks only end epochs


class SparseRows(msgspec.Struct, frozen=True):
    """Probability rows; dense, or only their non-zero entries (top-k / top-p leave few)."""

    shape: list[int]
    dense: TensorBytes | None = None
    indices: TensorBytes | None = None  # flat positions of the non-zero entries
    values: TensorBytes | None = None

    @classmethod
    def of(cls, rows: np.ndarray) -> "SparseRows":
        rows = np.asarray(rows, dtype=np.float32) if rows.dtype != np.float64 else rows
        flat = rows.reshape(-1)
        nonzero = np.flatnonzero(flat)
        if nonzero.size * 2 < flat.size:  # index + value cost twice a dense entry
            return cls(list(rows.shape), indices=TensorBytes.of(nonzero.astype(np.int64)),
                       values=TensorBytes.of(flat[nonzero]))
        return cls(list(rows.shape), dense=TensorBytes.of(rows))

    def array(self) -> np.ndarray:
        if self.dense is not None:
            return self.dense.array()
        if self.indices is None or self.values is None:
            raise ValueError("sparse rows need indices and values")
        values = self.values.array()
        out = np.zeros(int(np.prod(self.shape)), dtype=values.dtype)
        out[self.indices.array()] = values
        return out.reshape(self.shape)


class BlockHeader(msgspec.Struct, frozen=True):
    """One ring pass: a prompt (seq 0) or a draft block to verify."""

    request_id: str
    origin: str  # the node that schedules the request and waits for the result
    model_id: str
    n_layers: int
    ring: list[Stage]
    seq: int  # 0 = prompt, then one per verified block
    start: int  # tokens every stage's cache must hold before this pass
    inputs: list[int]  # token ids the first stage feeds
    n_committed: int
    params: GenerationParams
    draft_tokens: list[int] = []
    draft_probs: SparseRows | None = None  # None: a deterministic draft (or temperature 0), judged by p alone
    defer_bonus: bool = False
    # The run of speculation this block belongs to: every rejection starts a new one, and a
    # stage drops blocks of an ended epoch (several blocks of a request may be in flight).
    epoch: int = 0
    version: int = WIRE_VERSION


class Forward(msgspec.Struct, frozen=True):
    header: BlockHeader
    hop: int  # index into header.ring of the stage that receives this
    hidden: TensorBytes | None = None  # None on the first stage (it embeds header.inputs)
    compute: list[float] = []  # seconds each earlier stage spent on this pass


class Result(msgspec.Struct, frozen=True):
    request_id: str
    seq: int
    node_id: str  # who reports it (the last stage, or the stage that failed)
    emitted: list[int] = []
    accepted: int = 0
    drafted: int = 0
    kept: int = 0
    deferred: bool = False
    compute: list[float] = []
    error: str = ""
    logprobs: list[TokenLogprob] | None = None  # per emitted token, when the request asked


class Prepare(msgspec.Struct, frozen=True):
    model_id: str
    n_layers: int
    ring: list[Stage]
    nodes: list[PeerInfo] = []  # how to reach every stage, in case a member has not discovered them yet


class Release(msgspec.Struct, frozen=True):
    request_id: str


class Released(msgspec.Struct, frozen=True):
    """A stage's answer to `Release`: its final totals for the request (None: it held no state),
    in the reply itself, so the origin has every stage's before it reports the request."""

    report: StageReport | None = None


class GenerateRequest(msgspec.Struct, frozen=True):
    """Serve a request on the node that runs the draft (the API may be on any node)."""

    request_id: str
    model_id: str
    prompt: list[int]
    params: GenerationParams
    config: SpeculativeConfig


class GenerateChunk(msgspec.Struct, frozen=True):
    tokens: list[int] = []
    logprobs: list[TokenLogprob] | None = None  # one per token, when the request asked
    finish_reason: str | None = None  # set on the last chunk
    metrics: MetricsSnapshot | None = None  # set on the last chunk
    error: str = ""
    error_kind: str = ""  # "config" (the request is wrong), "cluster", or an admission refusal's reason
    retry_after_s: int = 0  # with an admission refusal: when to try again


class OpaqueStatus(msgspec.Struct, frozen=True):
    """Upstream's `broadcast_opaque_status`: a JSON string with a "type" key, for any listener."""

    request_id: str
    status: str


class Ack(msgspec.Struct, frozen=True):
    ok: bool = True
    error: str = ""


class Health(msgspec.Struct, frozen=True):
    info: PeerInfo
    version: int = WIRE_VERSION


_encoder = msgspec.msgpack.Encoder()


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


def decoder(kind: type) -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(kind)
