"""The engine backends by name, for the CLI, the placements and the process engine's child.

A module of its own so that the process engine (which hosts a backend by name) and the
placements (which build process engines) do not import each other.
"""

from __future__ import annotations

from exo.inference.engine import InferenceEngine

ENGINES = ("mlx", "tinygrad")


def check_engine_name(name: str) -> str:
    if name not in ENGINES:
        raise ValueError(f"unknown inference engine {name!r}; use one of {', '.join(ENGINES)}")
    return name


def make_engine(name: str = "mlx") -> InferenceEngine:
    """A fresh in-process engine by name; backends are imported only when chosen."""
    check_engine_name(name)
    if name == "tinygrad":
        from exo.inference.tinygrad.engine import TinygradInferenceEngine
        return TinygradInferenceEngine()
    from exo.inference.mlx.engine import MLXInferenceEngine
    return MLXInferenceEngine()
