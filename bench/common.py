"""Shared plumbing for benchmarks: run `exo run --json` in a fresh process, save JSON + PNG."""

from __future__ import annotations

import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Hashable, Mapping, Sequence

RESULTS = Path(__file__).parent / "results"


class NodeProcess:
    """An `exo` node in its own process (`command`), its output in `log_path`, stopped with
    SIGINT (its own clean shutdown); `base_url` is where it answers /healthcheck."""

    def __init__(self, command: list[str], log_path: Path | str, base_url: str, cwd: Path | None = None):
        self.base_url, self.log_path = base_url, Path(log_path)
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, cwd=cwd,
                                        env=os.environ.copy())

    def wait_ready(self, timeout_s: float = 600) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the node exited with {self.process.returncode}; see {self.log_path}")
            try:
                if httpx.get(f"{self.base_url}/healthcheck", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the node did not come up; see {self.log_path}")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


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


def partial_path(bench: str, side: str) -> Path:
    return RESULTS / f"{bench}.{side}.partial.json"


def partial_writer(bench: str, side: str, rows: list[dict], report: Callable[[dict], None],
                   resume: bool = False):
    """Append a row and rewrite the side's partial file, so a crash loses nothing measured.
    `resume` first loads the rows the file already holds into `rows` (the side then skips
    what they cover)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    if resume and partial_path(bench, side).exists():
        rows += json.loads(partial_path(bench, side).read_text())

    def keep(row: dict) -> None:
        rows.append(row)
        partial_path(bench, side).write_text(json.dumps(rows))
        report(row)

    return keep


def run_sides(bench: str, script: str, sides: Sequence[str], reuse: Sequence[str],
              resume: bool = False) -> list[dict]:
    """Every side's rows: each measured in a process of its own (`script ... --side S`, one
    after another: a model pair per process is all the memory holds), or read back from
    its last partial file when `reuse` names it. `resume` keeps the partial files (the side
    process is told so by the same argv and measures only what they lack)."""
    rows: list[dict] = []
    for side in sides:
        if side not in reuse:
            if not resume:
                partial_path(bench, side).unlink(missing_ok=True)
            argv = [a for a in sys.argv[1:] if a not in ("--reuse", *sides)]
            subprocess.run([sys.executable, script, *argv, "--side", side], check=True)
        rows += json.loads(partial_path(bench, side).read_text())
    return rows


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


def table_cells(table: Sequence[dict], group: Callable[[dict], Hashable],
                series: str = "mode") -> tuple[list, list, dict[Any, list[dict | None]]]:
    """A results table as a plot's grid: its groups and its series (each in the order it first
    appears) and, per series, its entry in every group (None where it has none)."""
    groups = list(dict.fromkeys(group(e) for e in table))
    names = list(dict.fromkeys(e[series] for e in table))
    cells = {name: [next((e for e in table if group(e) == g and e[series] == name), None) for g in groups]
             for name in names}
    return groups, names, cells


def pyplot():
    """matplotlib's pyplot, drawing off-screen (benchmarks only save PNGs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def grouped_bars(ax, groups: Sequence[str], series: Mapping[str, Sequence[float]],
                 **tick_style) -> list[list[float]]:
    """One bar per series side by side in every group, the group names centred under them.
    `series` maps each legend label to its value in every group; `tick_style` goes to the tick
    labels. Returns each series' bar positions (to mark other values on the same bars)."""
    width = 0.8 / len(series)
    positions = []
    for j, (label, values) in enumerate(series.items()):
        xs = [i + j * width for i in range(len(groups))]
        ax.bar(xs, values, width, label=label)
        positions.append(xs)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(groups))], groups, **tick_style)
    return positions


def save_figure(fig, stem: str) -> Path:
    """Lay the figure out and save it as results/<stem>.png, at the one resolution all plots use."""
    path = RESULTS / f"{stem}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
