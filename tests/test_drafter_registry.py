"""The drafter registry: a new drafter is one class plus one `register` line, and the config,
the engine and `make_proposer` all take it from there; the names load no drafter module."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from exo.inference.generate import GenerationParams
from exo.speculative.adaptive import AdaptiveK
from exo.speculative.config import ConfigError, SpeculativeConfig
from exo.speculative.drafters import (
    DraftBlock, DrafterKind, OneRequest, drafter_names, make_proposer, register, resolve, unregister,
)
from exo.speculative.drafters.hybrid import HybridDrafter
from exo.speculative.engine import resolved_drafter, wants_draft_model
from tests.helpers.decoding import collect, plain_tokens

DRAFTER_DIR = Path(__file__).resolve().parent.parent / "exo" / "speculative" / "drafters"


class Echo:
    """A throwaway drafter: the last committed token again, `k` times. Deterministic, so its
    blocks carry no probabilities, like the suffix drafter's."""

    def __init__(self):
        self.serves = OneRequest("echo drafter")
        self.released = False

    async def prefill(self, request_id, prompt):
        self.serves.bind(request_id)

    async def propose(self, request_id, committed, k, params, threshold, rng, interrupted=lambda: False,
                      trusted=0):
        self.serves.bind(request_id)
        return DraftBlock([committed[-1]] * k, None, len(committed), drafter="echo")

    def limit(self, chosen_k):
        return chosen_k

    def accept(self, request_id, committed_length):
        self.serves.bind(request_id)

    def verified(self, request_id, block, accepted, committed_length):
        self.serves.bind(request_id)

    def release(self, request_id):
        self.serves.check(request_id)
        self.released = True


@pytest.fixture
def echo():
    """"echo" registered for the test (and gone after it); yields the proposers it built."""
    built: list[Echo] = []

    def build(config, engine, shard, controller):
        built.append(Echo())
        return built[-1]

    register(DrafterKind("echo", needs_model=False, build=build))
    try:
        yield built
    finally:
        unregister("echo")


@pytest.mark.parametrize("pipelined", [False, True])
async def test_a_registered_drafter_runs_through_the_engine(make_speculative, tiny_llama, echo, pipelined):
    engine = make_speculative(tiny_llama, drafter="echo", pipelined=pipelined, adaptive_speculation=False,
                              draft_tokens=2)
    shard = await engine.full_shard(str(tiny_llama))
    await engine.ensure_shard(shard)
    params = GenerationParams(max_tokens=24, temperature=0.0)
    prompts = [[10, 20, 30], [7, 7, 7, 7]]
    for prompt in prompts:
        assert await collect(engine.generate(shard, prompt, params, eos_ids=frozenset())) == \
            await plain_tokens(tiny_llama, prompt, params)
    assert engine.draft.shard is None  # it needs no model, so none was loaded
    assert engine.get_metrics()["per_drafter"]["echo"]["drafted_tokens"] > 0
    assert len(echo) == len(prompts) and all(proposer.released for proposer in echo)  # one per request


def test_the_config_accepts_a_drafter_while_it_is_registered():
    with pytest.raises(ConfigError, match="drafter must be one of"):
        SpeculativeConfig(drafter="echo")
    register(DrafterKind("echo", needs_model=True, build=lambda *_: Echo()))
    try:
        assert "echo" in drafter_names()
        assert SpeculativeConfig().merged({"drafter": "echo"}).drafter == "echo"
        config = SpeculativeConfig(enabled=True, drafter="echo")
        assert wants_draft_model(config, "any-target")
        assert resolved_drafter(config, True) == "echo" and resolved_drafter(config, False) is None
    finally:
        unregister("echo")
    with pytest.raises(ConfigError, match="drafter must be one of"):
        SpeculativeConfig(drafter="echo")


@pytest.mark.parametrize("drafter,with_model,without_model", [
    ("auto", "hybrid", "suffix"), ("hybrid", "hybrid", "suffix"), ("suffix", "suffix", "suffix"),
    ("model", "model", None),
])
def test_what_runs_with_and_without_a_draft_model(drafter, with_model, without_model):
    assert (resolve(drafter, True), resolve(drafter, False)) == (with_model, without_model)
    config = SpeculativeConfig(enabled=True, drafter=drafter)
    assert (resolved_drafter(config, True), resolved_drafter(config, False)) == (with_model, without_model)
    assert resolved_drafter(SpeculativeConfig(enabled=False, drafter=drafter), True) is None


def test_names_are_taken_once_and_fallbacks_must_need_no_model():
    assert drafter_names() == ("auto", "model", "suffix", "hybrid")
    for name in ("auto", "model"):
        with pytest.raises(ValueError, match="taken"):
            register(DrafterKind(name, needs_model=False, build=lambda *_: Echo()))
    with pytest.raises(ValueError, match="without_model"):
        register(DrafterKind("echo", needs_model=True, build=lambda *_: Echo(), without_model="model"))
    with pytest.raises(ValueError, match="without_model"):
        register(DrafterKind("echo", needs_model=False, build=lambda *_: Echo(), without_model="suffix"))
    with pytest.raises(ValueError, match="hybrid"):
        unregister("suffix")  # what the hybrid runs without a model
    with pytest.raises(ValueError, match="not a drafter kind"):
        unregister("echo")
    assert drafter_names() == ("auto", "model", "suffix", "hybrid")


def test_make_proposer_builds_a_fresh_proposer_per_request_from_the_table():
    config = SpeculativeConfig(drafter="suffix", suffix_min_match=3, suffix_max_depth=9)
    first, second = (make_proposer(config, None, None, AdaptiveK(8, 4)) for _ in range(2))
    assert isinstance(first, HybridDrafter) and first.model is None and first is not second
    assert (first.suffix.min_match, first.suffix.max_depth) == (3, 9)
    for name in ("model", "hybrid"):
        with pytest.raises(ValueError, match="needs a draft model"):
            make_proposer(SpeculativeConfig(drafter=name), None, None, AdaptiveK(8, 4))
    with pytest.raises(ValueError, match="resolved first"):
        make_proposer(SpeculativeConfig(drafter="auto"), None, None, AdaptiveK(8, 4))


def test_no_drafter_module_imports_the_package_face():
    """The face re-exports the drafters' shared types; a drafter importing it back is the
    circle this layout removed."""
    for path in sorted(DRAFTER_DIR.glob("*.py")):
        if path.name == "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module != "exo.speculative.drafters", path
            elif isinstance(node, ast.Import):
                assert all(alias.name != "exo.speculative.drafters" for alias in node.names), path


def test_the_names_load_no_drafter_module():
    """config.py reads the registry: importing it (or the face) in a fresh interpreter works
    and loads none of the drafters, which are free to import config.py themselves."""
    script = ("import sys, exo.speculative.config, exo.speculative.drafters\n"
              "print(sorted(m for m in sys.modules if m.startswith('exo.speculative.drafters.')))")
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            cwd=DRAFTER_DIR.parent.parent.parent).stdout
    assert loaded.strip() == str(["exo.speculative.drafters.base", "exo.speculative.drafters.head",
                                  "exo.speculative.drafters.registry"])
