"""Where the target and draft engines run on this machine."""

from __future__ import annotations

import os

from exo.inference.engine import InferenceEngine

PLACEMENTS = ("threads", "processes")


def make_engine_pair(placement: str = "threads") -> tuple[InferenceEngine, InferenceEngine]:
    """(target, draft). `processes` pins the draft to the last CPU and the target to the rest,
    each with its own BLAS threads, so pipelined drafting really overlaps verification."""
    from exo.inference.mlx.engine import MLXInferenceEngine
    from exo.inference.process_engine import ProcessInferenceEngine

    if placement == "threads":
        return MLXInferenceEngine(), MLXInferenceEngine()
    if placement != "processes":
        raise ValueError(f"unknown placement {placement!r}; use one of {', '.join(PLACEMENTS)}")
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if len(cpus) < 2:
        raise ValueError("placement 'processes' needs at least 2 CPUs")
    target_cpus, draft_cpus = cpus[:-1], cpus[-1:]
    return (ProcessInferenceEngine(target_cpus, blas_threads=len(target_cpus)),
            ProcessInferenceEngine(draft_cpus, blas_threads=1))
