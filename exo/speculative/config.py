"""Speculative decoding settings, the draft-pair table and its validation."""

from __future__ import annotations

from typing import NamedTuple

import msgspec

from exo.speculative.drafters.registry import drafter_names

AUTO = "auto"
# What may propose tokens, as registered in exo/speculative/drafters/registry.py: a small
# model, repeats of the request's own text (a suffix automaton), the better of the two per
# block, or "auto": hybrid when a draft model is available, else the suffix drafter alone.
# The registry at import (the built-ins, e.g. for --drafter's choices); the `drafter` check
# reads the registry itself, so a drafter registered later is accepted.
DRAFTERS = drafter_names()
MAX_RING_WINDOW = 16

# Target -> draft. Every pair shares one tokenizer (same ids; small Qwen models pad the
# vocabulary to 151936, large ones to 152064, which is fine).
DRAFT_PAIRS: dict[str, str] = {
    "llama-3.1-70b": "llama-3.2-3b",
    "llama-3.3-70b": "llama-3.2-3b",
    "llama-3.1-8b": "llama-3.2-1b",
    "llama-3.2-3b": "llama-3.2-1b",
    "qwen-2.5-72b": "qwen-2.5-7b",
    "qwen-2.5-32b": "qwen-2.5-1.5b",
    "qwen-2.5-14b": "qwen-2.5-0.5b",
    "qwen-2.5-7b": "qwen-2.5-0.5b",
    "qwen2.5-coder-7b": "qwen2.5-coder-0.5b",
    "qwen2.5-coder-1.5b": "qwen2.5-coder-0.5b",
}

# Pairs users ask for that cannot work, with the reason.
REFUSED_PAIRS: dict[tuple[str, str], str] = {
    ("deepseek-v3", "deepseek-r1-distill-qwen-7b"): (
        "deepseek-r1-distill-qwen-7b uses the Qwen2.5 tokenizer while deepseek-v3 has its own "
        "129k-token vocabulary: the same id means different text, so draft tokens cannot be verified"
    ),
}


class ConfigError(ValueError):
    """A speculative setting is invalid; the message names the field and the allowed values."""


class SpeculativeConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    enabled: bool = False
    draft_tokens: int = 4
    draft_model: str = AUTO
    # Draft-confidence cut-off: stop drafting a block once the draft's top probability
    # falls below it. It only shortens blocks; acceptance stays exact rejection sampling.
    acceptance_threshold: float = 0.8
    max_speculation_depth: int = 8
    adaptive_speculation: bool = True
    pipelined: bool = False
    drafter: str = AUTO
    suffix_min_match: int = 1  # shortest repeat (tokens) the suffix drafter copies from (why 1: drafters/suffix.py)
    suffix_max_depth: int = 32  # the suffix drafter's own cap on a block
    # Rows of the draft model's output head: its most frequent tokens (the lowest BPE ids)
    # plus the special ones; 0 = the whole vocabulary. Exact either way (see inference/head_rows.py).
    draft_vocab: int = 0
    # Pipelined blocks a ring may have in flight at once (exo/speculative/pipeline/window.py):
    # 0 = auto (up to one per stage, fewer while whole blocks are seldom accepted), 1 = wait
    # for each verdict before sending the next block.
    ring_window: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.max_speculation_depth <= 64:
            raise ConfigError(f"max_speculation_depth must be in 1..64, got {self.max_speculation_depth}")
        if not 0 <= self.draft_tokens <= self.max_speculation_depth:
            raise ConfigError(
                f"draft_tokens must be in 0..max_speculation_depth ({self.max_speculation_depth}), "
                f"got {self.draft_tokens}"
            )
        if not 0.0 <= self.acceptance_threshold < 1.0:
            raise ConfigError(f"acceptance_threshold must be in [0, 1), got {self.acceptance_threshold}")
        if not self.draft_model:
            raise ConfigError("draft_model must be a model id or 'auto'")
        if self.drafter not in drafter_names():
            raise ConfigError(f"drafter must be one of {', '.join(drafter_names())}, got {self.drafter!r}")
        if not 1 <= self.suffix_min_match <= 64:
            raise ConfigError(f"suffix_min_match must be in 1..64, got {self.suffix_min_match}")
        if not 1 <= self.suffix_max_depth <= 256:
            raise ConfigError(f"suffix_max_depth must be in 1..256, got {self.suffix_max_depth}")
        if not 0 <= self.ring_window <= MAX_RING_WINDOW:
            raise ConfigError(f"ring_window must be in 0..{MAX_RING_WINDOW} (0: auto), got {self.ring_window}")
        if self.draft_vocab < 0:
            raise ConfigError(f"draft_vocab must be 0 (whole vocabulary) or a number of rows, got {self.draft_vocab}")

    def merged(self, overrides: dict) -> "SpeculativeConfig":
        """This config with the fields in `overrides` (a request's `speculative` object, as
        decoded JSON) replaced, in one conversion: unknown fields, types and the checks above
        are the config's own, and every error is a ConfigError naming the field."""
        try:
            return msgspec.convert({**msgspec.structs.asdict(self), **overrides}, SpeculativeConfig)
        except msgspec.ValidationError as exc:
            message = str(exc).replace("$.", "speculative.")
            if message.startswith("Object contains unknown field"):
                message = "unknown speculative field " + message.removeprefix("Object contains unknown field ")
            raise ConfigError(message) from None

    @property
    def threshold(self) -> float:
        """The draft-confidence cut a block uses: none at a fixed K (exactly K drafts every block)."""
        return self.acceptance_threshold if self.adaptive_speculation else 0.0


class Flag(NamedTuple):
    """How a config field appears on the command line of `exo` and `exo run`."""

    name: str
    help: str
    inverted: bool = False  # a boolean the flag turns off (e.g. --fixed-k sets adaptive_speculation false)
    metavar: str | None = None


# The command-line face of every field, in the order `--help` lists them; a field without an
# entry here fails tests/test_config.py. The API names a field as the field itself.
FLAGS: dict[str, Flag] = {
    "enabled": Flag("--enable-speculative", "draft tokens (see --drafter) and verify them exactly"),
    "drafter": Flag("--drafter", "what proposes tokens: model (a small draft model), suffix (repeats of the prompt "
                    "and output, no model), hybrid (the better of the two per block), auto (default: hybrid when "
                    "a draft model is available, else suffix)"),
    "draft_model": Flag("--draft-model", "draft model id, directory or .gguf (default: auto, from the draft-pair "
                        "table)"),
    "draft_tokens": Flag("--draft-tokens", "draft block size K, the start value when adaptive (default %(default)s)"),
    "max_speculation_depth": Flag("--max-speculation-depth", "largest K adaptive speculation may choose (default "
                                  "%(default)s)"),
    "acceptance_threshold": Flag("--speculative-threshold", "stop drafting a block when the draft's top "
                                 "probability falls below this (default %(default)s; never changes the output)"),
    "adaptive_speculation": Flag("--fixed-k", "disable adaptive K: draft exactly --draft-tokens every block (the "
                                 "confidence threshold is off; only the last block is shorter, capped at the "
                                 "tokens left)", inverted=True),
    "pipelined": Flag("--pipelined", "draft block n+1 while block n is verified (overlaps with --placement "
                      "processes)"),
    "ring_window": Flag("--ring-window", "with --pipelined on a ring: blocks in flight at once, each betting that "
                        "the ones before it are accepted entirely; 0 = auto (default: up to one per stage, fewer "
                        "while whole blocks are seldom accepted), 1 = one block at a time", metavar="W"),
    "suffix_min_match": Flag("--suffix-min-match", "shortest repeat (tokens) the suffix drafter copies from "
                             "(default %(default)s)"),
    "suffix_max_depth": Flag("--suffix-max-depth", "longest block the suffix drafter copies (default %(default)s)"),
    "draft_vocab": Flag("--draft-vocab", "score only this many of the draft model's most frequent tokens (the "
                        "lowest BPE ids, plus special tokens); 0 = all (default %(default)s). Cheaper draft steps; "
                        "never changes the output"),
}


def choose_draft(target: str, requested: str = AUTO) -> str:
    """The draft model for `target`: the requested one if allowed, else the table's."""
    if requested != AUTO:
        reason = REFUSED_PAIRS.get((target, requested))
        if reason:
            raise ConfigError(f"{requested} cannot draft for {target}: {reason}")
        return requested
    if target in DRAFT_PAIRS:
        return DRAFT_PAIRS[target]
    refused = [reason for (t, _), reason in REFUSED_PAIRS.items() if t == target]
    detail = f" ({refused[0]})" if refused else ""
    raise ConfigError(
        f"no draft model known for {target}{detail}; pass draft_model explicitly "
        f"(targets with a default draft: {', '.join(sorted(DRAFT_PAIRS))})"
    )
