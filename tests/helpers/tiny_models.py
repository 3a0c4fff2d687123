"""Tiny random-weight llama/qwen2 models written in Hugging Face layout, for fast tests."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models import llama, qwen2
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

EOS = "<|endoftext|>"


def write_byte_tokenizer(path: Path) -> int:
    """A byte-level tokenizer: 256 byte tokens plus an end-of-text token (id 256)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab[EOS] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([EOS])
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "bos_token": None,
        "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:",
    }))
    return vocab[EOS]


def make_tiny_model(path: Path, arch: str = "llama", layers: int = 4, seed: int = 0,
                    hidden: int = 64, heads: int = 4, kv_heads: int = 2, tied: bool = True,
                    context: int = 512) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    eos = write_byte_tokenizer(path)
    config = {
        "model_type": arch, "hidden_size": hidden, "num_hidden_layers": layers,
        "intermediate_size": hidden * 2, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-5, "vocab_size": 320, "rope_theta": 10000.0, "max_position_embeddings": context,
        "tie_word_embeddings": tied, "eos_token_id": eos,
    }
    module = {"llama": llama, "qwen2": qwen2}[arch]
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    # Larger-than-default weights make logits peaky, so greedy paths are not all ties.
    params = {k: v * 4 if v.ndim == 2 else v for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(path / "model.safetensors"), params)
    (path / "config.json").write_text(json.dumps(config))
    return path


def make_slow_twin(source: Path, path: Path, extra_layers: int) -> Path:
    """`source` plus `extra_layers` layers that add exactly zero to the residual stream (zero
    output projections): the same function, so a draft whose every token is accepted, but one
    that costs as much as a far larger model per step."""
    path.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / "config.json").read_text())
    weights = mx.load(str(source / "model.safetensors"))
    layers = config["num_hidden_layers"]
    template = {k.split(".", 3)[3]: v for k, v in weights.items() if k.startswith("model.layers.0.")}
    for i in range(layers, layers + extra_layers):
        for name, value in template.items():
            zero = name.endswith(("o_proj.weight", "down_proj.weight"))
            weights[f"model.layers.{i}.{name}"] = mx.zeros_like(value) if zero else value
    config["num_hidden_layers"] = layers + extra_layers
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    (path / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).write_text((source / name).read_text())
    return path


