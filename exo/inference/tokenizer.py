"""Tokenizer loading and chat formatting, the same for every engine."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

log = logging.getLogger("exo.tokenizer")


class Tokenizer:
    """A Hugging Face fast tokenizer plus every id that ends a turn (`eos_token_ids`)."""

    def __init__(self, hf_tokenizer: Any, eos_token_ids: frozenset[int]):
        self.hf = hf_tokenizer
        self.eos_token_ids = eos_token_ids
        self.eos_token_id = hf_tokenizer.eos_token_id

    def __len__(self) -> int:
        return len(self.hf)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def get_vocab(self) -> dict[str, int]:
        return self.hf.get_vocab()

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        """Render messages with the model's template (plain text if it has none)."""
        if getattr(self.hf, "chat_template", None):
            return self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        log.warning("model has no chat template; sending the raw message text")
        return "\n".join(m["content"] for m in messages)


def load_tokenizer(model_dir: Path) -> Tokenizer:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf = AutoTokenizer.from_pretrained(str(model_dir))
    eos = {int(hf.eos_token_id)} if hf.eos_token_id is not None else set()
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        configured = json.loads(path.read_text()).get("eos_token_id") if path.exists() else None
        if configured is not None:
            eos.update(configured if isinstance(configured, list) else [configured])
    return Tokenizer(hf, frozenset(int(i) for i in eos))
