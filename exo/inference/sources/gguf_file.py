"""A GGUF file on disk, converted to an MLX/tinygrad-loadable directory."""

from __future__ import annotations

from pathlib import Path

from exo.inference.sources.base import ModelSource, ModelSourceError
from exo.inference.sources.gguf_import import GGUFImportError, convert_gguf


class GGUFFileSource(ModelSource):
    def __init__(self, path: Path):
        self.path = Path(path).expanduser()

    def describe(self) -> str:
        return f"GGUF file {self.path}"

    def fetch(self, into: Path, scratch: Path) -> None:
        if not self.path.is_file():
            raise ModelSourceError(f"GGUF file {self.path} does not exist")
        try:
            convert_gguf(self.path, into)
        except GGUFImportError as exc:
            raise ModelSourceError(str(exc)) from exc
