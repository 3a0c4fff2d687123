"""Make MLX's CPU backend use a real BLAS on Linux.

The Linux `mlx[cpu]` wheel bundles netlib's reference BLAS (~2.5 GFLOP/s). Loading an
optimised CBLAS with global symbol visibility *before* `mlx.core` is first imported makes
the dynamic linker resolve MLX's `cblas_*` calls to it: ~3x faster decode, ~50x faster
prefill, same results within float32 rounding. Nothing changes on macOS (Accelerate).

On top of OpenBLAS, "auto" puts exo's own few-row kernel (`exo/native/small_gemm.c`, built
with the system C compiler by `make setup` or the first `exo` command, and cached under
EXO_HOME) in front of it:
OpenBLAS runs the products of one to a few dozen rows (a decode step, a draft step, a
K-token verify) at a third of the memory bandwidth, and those are most of what speculative
decoding computes. Everything bigger (prefill) still goes to OpenBLAS.

Choose with `EXO_BLAS=auto|openblas|blis|none` (auto = small-gemm over OpenBLAS, else
OpenBLAS, else BLIS, else bundled).

Selecting (`import exo`) only loads: no compiler, no subprocess, no output, nothing written.
Without a built kernel it takes plain OpenBLAS; `build_missing_kernel` then builds it, for
the next process (one that has chosen its BLAS cannot change it).
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("exo.blas")

LIBRARIES: dict[str, tuple[str, ...]] = {
    "openblas": (
        "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
        "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    ),
    "blis": (
        "/usr/lib/x86_64-linux-gnu/blis-pthread/libblas.so.3",
        "/usr/lib/aarch64-linux-gnu/blis-pthread/libblas.so.3",
    ),
}
FIX_HINT = "sudo apt-get install libopenblas0-pthread  (or run `make setup`)"


@dataclass(frozen=True)
class BlasChoice:
    """What `select_blas` did, so the CLI can report it once."""

    name: str  # "small-gemm+openblas", "openblas", "blis", "bundled" or "accelerate"
    path: str | None
    message: str
    kernel: str | None = None  # exo's few-row kernel, when it is in front


_choice: BlasChoice | None = None
_kernel_missing = False  # "auto" would have put the few-row kernel in front, but none is built
NOT_BUILT = "; exo's few-row kernel is not built yet (the next `exo` command or `make setup` builds it)"


def select_blas(preference: str | None = None) -> BlasChoice:
    """Load the preferred CBLAS globally; idempotent, never raises, silent, builds nothing."""
    global _choice, _kernel_missing
    if _choice is not None:
        return _choice
    if sys.platform != "linux":
        _choice = BlasChoice("accelerate", None, "MLX uses the platform BLAS")
        return _choice
    preference = (preference or os.environ.get("EXO_BLAS", "auto")).lower()
    if "mlx.core" in sys.modules:
        _choice = BlasChoice("bundled", None, "mlx.core was imported before exo; cannot swap its BLAS")
        return _choice
    if preference == "none":
        _choice = BlasChoice("bundled", None, "EXO_BLAS=none: MLX uses its bundled reference BLAS (slow)")
        return _choice
    order = ["openblas", "blis"] if preference == "auto" else [preference]
    if order[0] not in LIBRARIES:
        _choice = BlasChoice("bundled", None, f"unknown EXO_BLAS={preference!r} (use auto, openblas, blis or none)")
        return _choice
    note = ""
    for name in order:
        for path in LIBRARIES[name]:
            if not os.path.exists(path):
                continue
            if preference == "auto" and name == "openblas":
                kernel = built_small_gemm()
                if kernel is None:
                    _kernel_missing, note = True, NOT_BUILT
                else:
                    note = _load_in_front(kernel, path)
                    if not note:
                        _choice = BlasChoice("small-gemm+openblas", path, f"MLX CPU backend uses exo's few-row "
                                             f"kernel ({kernel}) over openblas ({path})", str(kernel))
                        return _choice
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError as exc:
                log.debug("could not load %s: %s", path, exc)
                continue
            _choice = BlasChoice(name, path, f"MLX CPU backend uses {name} ({path}){note}")
            return _choice
    _choice = BlasChoice(
        "bundled", None, f"no optimised BLAS found; MLX runs ~3x slower. Fix: {FIX_HINT}"
    )
    return _choice


def row_exact_rows() -> int | None:
    """Matrix products of at most this many rows compute every row exactly as they would
    compute it alone (exo's few-row kernel reduces each row on its own); None where no such
    bound is known. Batching packs rows within it, so a batched row equals its solo run."""
    choice = select_blas()
    if choice.kernel is None:
        return None
    return int(ctypes.CDLL(choice.kernel).exo_small_gemm_rows())


SMALL_GEMM_SOURCE = Path(__file__).parent / "native" / "small_gemm.c"


def _small_gemm_target() -> Path:
    """Where the kernel built from this source for this CPU lives (raises OSError if the
    source is missing). -march=native code is for this CPU only: a home directory shared
    between machines must not hand one machine's build to another."""
    key = hashlib.sha256(SMALL_GEMM_SOURCE.read_bytes() + _cpu_signature().encode()).hexdigest()[:16]
    home = Path(os.environ.get("EXO_HOME") or Path.home() / ".cache" / "exo").expanduser()
    return home / "native" / f"small_gemm-{key}.so"


def built_small_gemm() -> Path | None:
    """The few-row kernel if it is built: a file lookup, no compiler, nothing written."""
    try:
        target = _small_gemm_target()
    except OSError:
        return None
    return target if target.exists() else None


def small_gemm_library(announce: bool = False) -> tuple[Path | None, str]:
    """The built few-row kernel, compiling it first (once per source and CPU) if it is not
    built, or None and why not. `announce`: say so on stderr before compiling."""
    kernel = built_small_gemm()
    if kernel is not None:
        return kernel, ""
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        return None, "; exo's few-row kernel needs a C compiler (sudo apt-get install gcc)"
    try:
        target = _small_gemm_target()
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return None, f"; could not build exo's few-row kernel: {exc}"
    if announce:
        print("building exo's few-row kernel (once)…", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        for flags in (["-fopenmp"], []):  # without OpenMP (no libgomp): one thread, still faster
            command = [compiler, "-O3", "-march=native", *flags, "-shared", "-fPIC", "-o", str(built),
                       str(SMALL_GEMM_SOURCE), "-ldl"]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.TimeoutExpired) as exc:
                return None, f"; could not build exo's few-row kernel: {exc}"
            if done.returncode == 0:
                os.replace(built, target)  # atomic: a concurrent build just wins or loses the race
                return target, ""
            log.debug("building %s with %s failed: %s", target.name, flags, done.stderr.strip())
    return None, f"; could not build exo's few-row kernel: {done.stderr.strip()[:300]}"


def build_missing_kernel() -> bool:
    """Build the few-row kernel if `select_blas` wanted it and found none built; True when it
    was built just now. It takes effect in the next process that imports exo: this one chose
    its BLAS at import and cannot change it (the `exo` command starts itself again)."""
    global _choice, _kernel_missing
    choice = select_blas()
    if not _kernel_missing:
        return False
    kernel, why = small_gemm_library(announce=True)
    _kernel_missing = kernel is None
    note = f"; exo's few-row kernel is built ({kernel}), in use from the next run" if kernel else why
    _choice = dataclasses.replace(choice, message=choice.message.replace(NOT_BUILT, note))
    return kernel is not None


def _cpu_signature() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return os.uname().machine
    wanted = [line for line in lines if line.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(dict.fromkeys(wanted)) + os.uname().machine


def _load_in_front(kernel: Path, library: str) -> str:
    """Load the kernel globally, then `library` (which it forwards big products to and which
    provides the other cblas symbols): MLX's `cblas_sgemm` resolves to the first. Returns ""
    or, when the kernel would not load, a note that says why (reported by `report_blas`)."""
    os.environ["EXO_BLAS_LARGE"] = library
    # Idle OpenMP threads sleep instead of spinning: several engine processes on one machine
    # (a ring on loopback, tests) otherwise burn each other's cores. Measured here: a 3-node
    # ring test 25.6 -> 15.3 s, single-process decode unchanged within noise. libgomp reads
    # this when it loads, which is below.
    os.environ.setdefault("OMP_WAIT_POLICY", "passive")
    try:
        ctypes.CDLL(library)  # the kernel's loader aborts if this fails: find out here first
        ctypes.CDLL(str(kernel), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(library, mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        return f"; could not load exo's few-row kernel {kernel}: {exc}"
    return ""


def report_blas() -> None:
    """Log the BLAS choice once (a warning when we are on the slow path)."""
    choice = select_blas()
    level = logging.WARNING if choice.name == "bundled" else logging.INFO
    log.log(level, choice.message)


def main() -> None:
    """`make setup` calls this: build the few-row kernel now, not on the first `exo` command,
    and say which BLAS `import exo` picks."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if build_missing_kernel():
        # This process chose before the kernel existed: a fresh one reports what exo will use
        # (and checks that it finds the build).
        subprocess.run([sys.executable, "-c", "import exo.blas; exo.blas.main()"], check=False)
        return
    report_blas()
