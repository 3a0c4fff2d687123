"""Which engine runs the target and the draft, and where they run on this machine."""

from __future__ import annotations

import os

from exo.inference.backends import check_engine_name, make_engine
from exo.inference.engine import InferenceEngine
from exo.inference.process_engine import ProcessInferenceEngine

PLACEMENTS = ("threads", "processes")


def make_engine_pair(placement: str = "threads", engine: str = "mlx",
                     draft_engine: str | None = None) -> tuple[InferenceEngine, InferenceEngine]:
    """(target, draft) on engines `engine` and `draft_engine` (default: the target's), so a
    draft can run on one backend and the target on another. `processes` pins the draft to the
    last CPU and the target to the rest, each with its own BLAS threads, so pipelined
    drafting really overlaps verification."""
    draft_engine = check_engine_name(draft_engine or engine)
    check_engine_name(engine)
    if placement == "threads":
        return make_engine(engine), make_engine(draft_engine)
    if placement != "processes":
        raise ValueError(f"unknown placement {placement!r}; use one of {', '.join(PLACEMENTS)}")
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if len(cpus) < 2:
        raise ValueError("placement 'processes' needs at least 2 CPUs")
    target_cpus, draft_cpus = cpus[:-1], cpus[-1:]
    return (ProcessInferenceEngine(target_cpus, blas_threads=len(target_cpus), engine=engine),
            ProcessInferenceEngine(draft_cpus, blas_threads=1, engine=draft_engine))
