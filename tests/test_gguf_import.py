"""GGUF -> Hugging Face conversion on the real SmolLM2-135M checkpoint, and on broken files.

The converted model is checked against an independent oracle (MLX's own GGUF reader with
llama.cpp's rotary layout, tests/gguf_reference.py), not against the converter's own output.
"""

import re
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest

from exo.inference.mlx.engine import MLXInferenceEngine
from exo.inference.sources import ModelSourceError, ModelStore
from exo.inference.sources.gguf_import import GGUFImportError, convert_gguf
from exo.inference.tokenizer import load_tokenizer
from tests.helpers.gguf_reference import native_gguf_llama_logits

PROMPT = "The quick brown fox jumps over the lazy dog near the river"


@pytest.fixture(scope="module")
def smollm2_gguf(smollm2_dir) -> Path:
    """The verified GGUF the converted SmolLM2 came from (already in the cache after smollm2_dir)."""
    path = ModelStore().gguf_path("smollm2-135m")
    assert path.is_file() and path.stat().st_size > 50_000_000
    return path


@pytest.fixture(scope="module")
def smollm2_reader(smollm2_gguf):
    """The GGUF parsed once for the module (parsing its 49k-token vocabulary takes seconds)."""
    import gguf

    return gguf.GGUFReader(smollm2_gguf)


@pytest.fixture(scope="module")
def smollm2_engine(smollm2_dir):
    engine = MLXInferenceEngine(dtype="float32")  # the oracle runs in float32 too
    yield engine
    engine.close()


async def full_logits(engine, model_dir: Path, tokens: list[int]) -> np.ndarray:
    shard = await engine.full_shard(str(model_dir))
    logits, _ = await engine.infer_tensor(uuid.uuid4().hex, shard, np.asarray([tokens]))
    return logits[0]


# --- the converted model equals the GGUF it came from -------------------------------------------

async def test_converted_logits_match_native_gguf(smollm2_dir, smollm2_gguf, smollm2_engine):
    shard = await smollm2_engine.full_shard(str(smollm2_dir))
    assert shard.n_layers == 30 and shard.is_first_layer() and shard.is_last_layer()
    await smollm2_engine.ensure_shard(shard)
    tokens = smollm2_engine.tokenizer.encode(PROMPT)
    assert 9 <= len(tokens) <= 14, tokens

    got = await full_logits(smollm2_engine, smollm2_dir, tokens)
    expected = native_gguf_llama_logits(smollm2_gguf, tokens)

    assert got.shape == expected.shape == (len(tokens), 49152)
    assert np.isfinite(got).all()
    # Not a trivially-equal pair (e.g. all zeros): the logits have real spread.
    assert float(expected.std(axis=-1).min()) > 0.5
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-3)
    assert got.argmax(-1).tolist() == expected.argmax(-1).tolist()


async def test_greedy_continuation_is_paris(smollm2_dir, smollm2_engine):
    engine = smollm2_engine
    shard = await engine.full_shard(str(smollm2_dir))
    await engine.ensure_shard(shard)
    prompt = engine.tokenizer.encode("The capital of France is")
    request = uuid.uuid4().hex
    logits, _ = await engine.infer_tensor(request, shard, np.asarray([prompt]))
    generated = [int(logits[0, -1].argmax())]
    for _ in range(2):  # a couple more greedy steps through the KV cache
        logits, _ = await engine.infer_tensor(request, shard, np.asarray([[generated[-1]]]))
        assert logits.shape[1] == 1
        generated.append(int(logits[0, -1].argmax()))
    assert engine.cache_offset(request) == len(prompt) + 2
    engine.free_cache(request)

    text = engine.tokenizer.decode(generated)
    assert text.startswith(" Paris"), (generated, text)


# --- the rebuilt tokenizer ------------------------------------------------------------------------

def test_converted_tokenizer(smollm2_dir, smollm2_reader):
    tok = load_tokenizer(smollm2_dir)
    assert tok.encode("<|im_start|>") == [1]
    assert tok.encode("<|im_end|>") == [2]
    assert 2 in tok.eos_token_ids

    turn = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    ids = tok.encode(turn)
    assert ids[0] == 1 and ids.count(1) == 1 and ids.count(2) == 1
    assert tok.decode(ids) == turn
    assert tok.decode(ids, skip_special_tokens=True) == "user\nWhat is 2+2?\n"

    chat = tok.chat_prompt([{"role": "user", "content": "Hi there"}])
    assert chat.endswith("<|im_start|>assistant\n")
    chat_ids = tok.encode(chat)
    assert chat_ids.count(1) == 3 and chat_ids.count(2) == 2  # system + user + assistant header
    assert tok.decode(chat_ids) == chat

    for text in ["Hello, world!", "  two leading spaces,\ttabs\tand\nnew\n\nlines  ",
                 "Ünïcödé — 日本語 🙂 naïve café", "def f(x):\n    return x ** 2  # 2024-11-29\n", ""]:
        assert tok.decode(tok.encode(text)) == text, text
    # SmolLM2 splits numbers into single digits.
    assert [tok.decode([i]) for i in tok.encode("31415")] == list("31415")

    # Every GGUF token string has the GGUF's id in the converted vocabulary.
    tokens = smollm2_reader.fields["tokenizer.ggml.tokens"].contents()
    vocab = tok.get_vocab()
    assert len(tokens) == 49152 and len(vocab) == len(tokens)
    assert all(vocab[t] == i for i, t in enumerate(tokens))


# --- broken files fail cleanly, naming the file ---------------------------------------------------

def expect_import_error(path: Path, out_dir: Path, *fragments: str) -> str:
    out_dir.mkdir(exist_ok=True)
    with pytest.raises(GGUFImportError, match=re.escape(path.name)) as info:
        convert_gguf(path, out_dir, progress=False)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_random_bytes_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    plain = tmp_path / "noise.gguf"
    plain.write_bytes(rng.bytes(1 << 20))
    expect_import_error(plain, tmp_path / "out1", "not a GGUF file")

    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    expect_import_error(empty, tmp_path / "out2", "not a GGUF file")

    # Right magic, garbage after it: must reach the parser and still fail as GGUFImportError.
    magic = tmp_path / "magic-then-noise.gguf"
    magic.write_bytes(b"GGUF" + rng.bytes(1 << 20))
    expect_import_error(magic, tmp_path / "out3", "cannot parse GGUF")
    assert not (tmp_path / "out3" / "config.json").exists()


@pytest.mark.heavy
@pytest.mark.parametrize("keep", [1_000_000, 4 << 20, -1000], ids=["in-metadata", "in-embeddings", "last-tensor"])
def test_truncated_gguf_is_refused(tmp_path, smollm2_gguf, keep):
    data = smollm2_gguf.read_bytes()
    cut = tmp_path / f"smollm2-cut{keep}.gguf"
    cut.write_bytes(data[:keep])
    assert 0 < cut.stat().st_size < len(data)
    message = expect_import_error(cut, tmp_path / "out")
    assert "truncated" in message
    assert list((tmp_path / "out").iterdir()) == []


def nan_corrupted_copy(src: Path, reader, dest: Path, tensor: str) -> None:
    """Copy `src` (parsed as `reader`), overwriting one tensor's data with 0xFF (NaN scales / NaN floats)."""
    info = {t.name: (int(t.data_offset), int(t.n_bytes)) for t in reader.tensors}
    offset, size = info[tensor]
    shutil.copyfile(src, dest)
    with open(dest, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * size)


@pytest.fixture(scope="module")
def nan_gguf(tmp_path_factory, smollm2_gguf, smollm2_reader) -> Path:
    """SmolLM2's GGUF with blk.0.ffn_down.weight (the third tensor) all 0xFF, built once:
    both tests below only read it."""
    bad = tmp_path_factory.mktemp("nan-gguf") / "smollm2-nan.gguf"
    nan_corrupted_copy(smollm2_gguf, smollm2_reader, bad, "blk.0.ffn_down.weight")
    return bad


@pytest.mark.heavy
def test_corrupt_tensor_data_is_refused(tmp_path, nan_gguf):
    expect_import_error(nan_gguf, tmp_path / "out", "blk.0.ffn_down.weight", "NaN")


def assert_store_left_nothing(home: Path) -> None:
    models = home / "models"
    assert not models.exists() or list(models.iterdir()) == [], list(models.iterdir())
    tmp = home / "tmp"
    assert not tmp.exists() or list(tmp.iterdir()) == [], list(tmp.iterdir())


def test_store_refuses_random_bytes_and_leaves_nothing(tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(np.random.default_rng(1).bytes(1 << 16))
    home = tmp_path / "home"
    with pytest.raises(ModelSourceError, match=re.escape(bad.name)):
        ModelStore(home).model_dir_for(str(bad))
    assert (home / "locks").is_dir()  # it really went through the store
    assert_store_left_nothing(home)


@pytest.mark.heavy
def test_store_refuses_truncated_gguf_and_leaves_nothing(tmp_path, smollm2_gguf):
    bad = tmp_path / "smollm2-truncated.gguf"
    bad.write_bytes(smollm2_gguf.read_bytes()[: 4 << 20])
    home = tmp_path / "home"
    store = ModelStore(home)
    with pytest.raises(ModelSourceError, match=re.escape(bad.name)) as info:
        store.model_dir_for(str(bad))
    assert "truncated" in str(info.value)
    assert_store_left_nothing(home)
    # A second attempt fails the same way instead of finding a stale model.
    with pytest.raises(ModelSourceError, match="truncated"):
        store.model_dir_for(str(bad))
    assert_store_left_nothing(home)


@pytest.mark.heavy
def test_store_discards_half_written_conversion(tmp_path, nan_gguf):
    """Corruption found mid-conversion, after model.safetensors was partly written."""
    home = tmp_path / "home"
    with pytest.raises(ModelSourceError, match=re.escape(nan_gguf.name)) as info:
        ModelStore(home).model_dir_for(str(nan_gguf))
    assert "NaN" in str(info.value)
    assert_store_left_nothing(home)
