"""A model directory the user already has (Hugging Face layout)."""

from __future__ import annotations

import shutil
from pathlib import Path

from exo.inference.sources.base import ModelSource, ModelSourceError

def check_model_dir(path: Path) -> None:
    has_tokenizer = (path / "tokenizer.json").exists() or (path / "tokenizer.model").exists()
    if not (path / "config.json").exists() or not has_tokenizer or not any(path.glob("*.safetensors")):
        raise ModelSourceError(
            f"{path} is not a Hugging Face model directory (needs config.json, *.safetensors, tokenizer files)"
        )


class LocalDirSource(ModelSource):
    def __init__(self, path: Path):
        self.path = Path(path).expanduser()

    def describe(self) -> str:
        return f"local directory {self.path}"

    def fetch(self, into: Path, scratch: Path) -> None:
        check_model_dir(self.path)
        for item in self.path.iterdir():
            if item.is_file():
                shutil.copy2(item, into / item.name)
