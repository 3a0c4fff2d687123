"""KV-cache rollback after verification, for any engine behind the interface."""

from exo.speculative.kv.rollback import KVRollbackError, rollback_to

__all__ = ["KVRollbackError", "rollback_to"]
