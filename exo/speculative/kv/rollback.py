"""Roll a request's cache back to an exact length, or fail loudly.

A cache that ends up at any other length than asked would make every later token attend
to the wrong context: silently wrong output. So every rollback is checked afterwards.
"""

from __future__ import annotations

from exo.inference.engine import InferenceEngine


class KVRollbackError(RuntimeError):
    pass


def rollback_to(engine: InferenceEngine, request_id: str, keep_tokens: int) -> int:
    """Trim the cache to `keep_tokens`; returns how many tokens were dropped."""
    held = engine.cache_offset(request_id)
    if keep_tokens > held or keep_tokens < 0:
        raise KVRollbackError(f"request {request_id!r}: cannot keep {keep_tokens} tokens, cache holds {held}")
    dropped = held - keep_tokens
    if dropped:
        engine.trim_cache(request_id, dropped)
    if engine.cache_offset(request_id) != keep_tokens:
        raise KVRollbackError(
            f"request {request_id!r}: cache holds {engine.cache_offset(request_id)} tokens after "
            f"rollback to {keep_tokens}"
        )
    return dropped
