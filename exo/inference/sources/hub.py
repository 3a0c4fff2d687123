"""The Hugging Face hub, the normal source on a user's machine."""

from __future__ import annotations

import shutil
from pathlib import Path

from exo.inference.sources.base import ModelSource, ModelSourceError

PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]


class HubSource(ModelSource):
    def __init__(self, repo: str, revision: str | None = None):
        self.repo, self.revision = repo, revision

    def describe(self) -> str:
        return f"Hugging Face hub {self.repo}"

    def fetch(self, into: Path, scratch: Path) -> None:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        try:
            snapshot_download(self.repo, revision=self.revision, local_dir=str(into),
                              allow_patterns=PATTERNS, cache_dir=str(scratch / "hf-cache"))
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
            raise ModelSourceError(f"could not download {self.repo} from the Hugging Face hub: {exc}") from exc
        for leftover in into.glob(".cache"):
            shutil.rmtree(leftover, ignore_errors=True)
