"""Shared plumbing for benchmarks: run `exo run --json` in a fresh process, save JSON + PNG."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def exo_run_json(model: str, prompt: str, *, env: dict[str, str] | None = None, extra: list[str] = (),
                 max_tokens: int = 64, timeout: float = 1800) -> dict[str, Any]:
    """One `exo run --json` in its own process, so BLAS choice and memory start clean."""
    command = [sys.executable, "-m", "exo.main", "run", model, "--prompt", prompt, "--json",
               "--max-tokens", str(max_tokens), *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def save(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2))
    return path
