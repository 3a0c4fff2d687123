"""`import exo` does no work: it loads the BLAS that is there and builds nothing (issue 26)."""

import os
import shutil
import subprocess
import sys

import pytest

# Reports every process the import would start (a compiler, anything) on stderr.
WATCH = ("import sys\n"
         "def watch(event, args):\n"
         "    if event in ('subprocess.Popen', 'os.posix_spawn', 'os.exec', 'os.fork', 'os.spawn', 'os.system'):\n"
         "        sys.stderr.write(f'{event} {args!r}\\n')\n"
         "sys.addaudithook(watch)\n"
         "import exo\n")


@pytest.mark.parametrize("compiler", ["no compiler on PATH", "the usual PATH"])
def test_import_is_silent_starts_nothing_and_writes_nothing(tmp_path, compiler):
    home, bare = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    bare.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "EXO_BLAS"}  # "auto": wants the kernel
    env["EXO_HOME"] = str(home)
    if compiler == "no compiler on PATH":
        env["PATH"] = str(bare)
    for code in ("import exo", WATCH):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                              env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert done.stdout == "" and done.stderr == ""
        assert list(home.iterdir()) == []  # no build started
    check = "import exo.blas; print(exo.blas.select_blas().name)"
    chosen = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60,
                            env=env, cwd=tmp_path).stdout.strip()
    assert chosen != "small-gemm+openblas"  # nothing built in this EXO_HOME: plain OpenBLAS (or whatever there is)


def test_with_the_kernel_built_import_puts_it_in_front_of_openblas():
    """The suite runs after `make setup`, which builds the kernel: `import exo` loads it."""
    from exo.blas import LIBRARIES, built_small_gemm

    if sys.platform != "linux":
        pytest.skip("the kernel is for MLX's Linux CPU backend")
    if not any(os.path.exists(path) for path in LIBRARIES["openblas"]):
        pytest.skip("no OpenBLAS here")
    if os.environ.get("EXO_BLAS", "auto").lower() != "auto":
        pytest.skip(f"EXO_BLAS={os.environ['EXO_BLAS']} asks for something else")
    if built_small_gemm() is None and not (shutil.which("gcc") or shutil.which("cc")):
        pytest.skip("no C compiler here, so `make setup` could not build the kernel")
    assert built_small_gemm() is not None, "the kernel is not built: run `make setup`"
    check = "import exo.blas; print(exo.blas.select_blas().name); print(exo.blas.select_blas().kernel)"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.split("\n")[:2] == ["small-gemm+openblas", str(built_small_gemm())]
