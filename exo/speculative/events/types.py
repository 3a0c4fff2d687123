"""Event types: one tagged union, versioned, frozen (an event is a fact, not a mutable object)."""

from __future__ import annotations

from typing import Union

import msgspec

from exo.speculative.metrics import DrafterSnapshot

EVENT_VERSION = 1


class _Event(msgspec.Struct, frozen=True, tag_field="type", forbid_unknown_fields=False):
    request_id: str
    version: int = EVENT_VERSION
    node_id: str = ""
    timestamp: float = 0.0


class DraftProposed(_Event, tag="draft_proposed"):
    block: int = 0  # block index within the request
    tokens: int = 0  # draft tokens in the block
    drafter: str = "model"  # who proposed it: model, suffix, none


class BlockVerified(_Event, tag="block_verified"):
    block: int = 0
    drafter: str = "model"
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    verify_seconds: float = 0.0


class KVRollback(_Event, tag="kv_rollback"):
    """Every holder of this request's KV for `shard` must keep exactly `keep_tokens`."""

    shard: str = ""  # "model_id:start-end"
    keep_tokens: int = 0
    block: int = -1  # the verified block whose verdict this is (-1: not a ring stage's)
    # A ring's rollbacks (sent when a verdict rejects a draft token) end epochs: this one
    # starts `epoch` (stages apply them in epoch order and drop every block of an earlier one).
    epoch: int = 0


class StageReport(_Event, tag="stage_report"):
    """A ring stage's state after it applied the rollback of block `block` (-1: the request
    was released; the final totals). Cluster-wide metrics, and the proof that every stage
    trimmed to the same length."""

    shard: str = ""
    block: int = 0
    cache_offset: int = 0
    forwards: int = 0
    forward_seconds: float = 0.0
    tokens: int = 0  # tokens this stage has run through its layers for the request
    epoch: int = 0
    dropped: int = 0  # blocks of an ended epoch dropped before computing them
    discarded: int = 0  # blocks whose epoch ended while this stage computed them
    discarded_seconds: float = 0.0  # compute spent on those
    messages: int = 0  # sent for the request before this report (passes, results, rollbacks, reports)
    bytes_sent: int = 0


class MetricsUpdate(_Event, tag="metrics_update"):
    acceptance_rate: float = 0.0
    mean_accepted_length: float = 0.0
    tokens_per_second: float = 0.0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    emitted_tokens: int = 0
    per_position_acceptance: list[float] = []
    per_drafter: dict[str, DrafterSnapshot] = {}


class SpeculationFallback(_Event, tag="speculation_fallback"):
    reason: str = ""


Event = Union[DraftProposed, BlockVerified, KVRollback, MetricsUpdate, SpeculationFallback, StageReport]
