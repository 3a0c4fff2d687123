"""Convert a GGUF checkpoint into a Hugging Face-layout directory without torch.

Dequantizes every tensor with the ``gguf`` package, renames it to the HF
convention, streams it into ``model.safetensors``, and rebuilds ``config.json``
plus a ``tokenizers`` tokenizer from the GGUF metadata, so mlx-lm/transformers
can load the result like any downloaded checkpoint.
"""

from __future__ import annotations

import json
import logging
import re
import struct
import sys
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np
from tqdm import tqdm

logger = logging.getLogger(__name__)

SUPPORTED_ARCHS: dict[str, str] = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# output dtype -> (safetensors code, numpy storage type); bf16 is stored as raw uint16
_DTYPES: dict[str, tuple[str, Any]] = {
    "float32": ("F32", np.float32), "float16": ("F16", np.float16), "bfloat16": ("BF16", np.uint16),
}
_QWEN2_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_IGNORABLE = {"rope_freqs.weight"}
_CHUNK_BYTES = 64 << 20  # dequantize at most ~64 MiB of float32 at a time to keep RSS flat
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4


class GGUFImportError(ValueError):
    """The GGUF file is unreadable, corrupt, truncated, or describes an unsupported model."""


def _open_reader(path: Path) -> Any:
    """Open with GGUFReader, turning its struct/numpy failures into GGUFImportError."""
    import gguf

    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise GGUFImportError(f"{path}: cannot read file: {e}") from e
    if magic != b"GGUF":
        raise GGUFImportError(f"{path}: not a GGUF file (magic bytes {magic!r}, expected b'GGUF')")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # reader raises ValueError/KeyError/IndexError on damaged headers
        size = path.stat().st_size
        raise GGUFImportError(f"{path}: cannot parse GGUF, file is truncated or corrupt ({size} bytes): {type(e).__name__}: {e}") from e
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise GGUFImportError(f"{path}: truncated: tensor {t.name} ends at byte {t.data_offset + t.n_bytes} but file has {size}")
    return reader


def _meta(reader: Any, path: Path, key: str, default: Any = ...) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise GGUFImportError(f"{path}: missing required metadata key {key!r}")
        return default
    try:
        return field.contents()
    except Exception as e:
        raise GGUFImportError(f"{path}: unreadable metadata value for {key!r}: {e}") from e


def _hf_name(name: str) -> str | None:
    """Map a GGUF tensor name to its HF name; None if it is unknown."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def _f32(x: Any) -> float:
    """GGUF floats are float32; print them as the short decimal they were written from (1e-05, not 9.99e-06)."""
    return float(f"{float(x):.7g}")


def _build_config(reader: Any, path: Path, tensors: dict[str, Any], dtype: str) -> dict[str, Any]:
    arch = _meta(reader, path, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise GGUFImportError(f"{path}: unsupported architecture {arch!r}; supported: {', '.join(sorted(SUPPORTED_ARCHS))}")
    g = lambda key, default=...: _meta(reader, path, f"{arch}.{key}", default)  # noqa: E731
    scaling = g("rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise GGUFImportError(f"{path}: unsupported rope scaling {scaling!r} (only none/linear)")
    hidden, n_head = int(g("embedding_length")), int(g("attention.head_count"))
    if "token_embd.weight" not in tensors or "blk.0.attn_q.weight" not in tensors:
        raise GGUFImportError(f"{path}: missing token_embd.weight or blk.0.attn_q.weight tensor")
    head_dim = int(tensors["blk.0.attn_q.weight"].shape[1]) // n_head  # gguf dims are (in, out)
    cfg: dict[str, Any] = {
        "architectures": [SUPPORTED_ARCHS[arch]], "model_type": arch,
        "hidden_size": hidden, "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": int(g("block_count")), "num_attention_heads": n_head,
        "num_key_value_heads": int(g("attention.head_count_kv", n_head)),
        "rms_norm_eps": _f32(g("attention.layer_norm_rms_epsilon")), "rope_theta": _f32(g("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(g("context_length")), "vocab_size": int(tensors["token_embd.weight"].shape[1]),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": arch == "qwen2" or "blk.0.attn_q.bias" in tensors, "hidden_act": "silu",
        "bos_token_id": _meta(reader, path, "tokenizer.ggml.bos_token_id", None),
        "eos_token_id": _meta(reader, path, "tokenizer.ggml.eos_token_id", None),
        "torch_dtype": dtype, "dtype": dtype,
    }
    if arch == "llama":
        cfg["mlp_bias"] = False
    if scaling == "linear":
        cfg["rope_scaling"] = {"type": "linear", "rope_type": "linear", "factor": _f32(g("rope.scaling.factor"))}
    if head_dim != hidden // n_head or int(g("rope.dimension_count", head_dim)) != hidden // n_head:
        cfg["head_dim"] = head_dim
    return cfg


def _expected_shape(hf: str, cfg: dict[str, Any]) -> tuple[int, ...]:
    """HF (row-major, out x in) shape each tensor must have, to catch layout bugs early."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim", h // cfg["num_attention_heads"])
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    out_in = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
              "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
    if hf in ("model.embed_tokens.weight", "lm_head.weight"):
        return (v, h)
    if hf.endswith("norm.weight"):
        return (h,)
    proj, kind = hf.split(".")[-2:]
    return out_in[proj] if kind == "weight" else out_in[proj][:1]


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's per-head (2, d/2) -> (d/2, 2) row interleave for its rotary layout."""
    rest = w.shape[1:]
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _to_dtype(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":  # numpy has no bf16: round-to-nearest-even on the top 16 bits
        u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.ascontiguousarray(a, dtype=_DTYPES[dtype][1])


def _dequantized_chunks(t: Any, path: Path, permute_heads: int | None) -> Iterator[np.ndarray]:
    """Yield the tensor as float32 row blocks (whole tensor when rows must be un-permuted)."""
    import gguf

    shape = tuple(int(d) for d in reversed(t.shape))
    row_bytes = 4 * int(np.prod(shape[1:], dtype=np.int64))
    step = shape[0] if permute_heads or len(shape) == 1 else max(1, _CHUNK_BYTES // max(row_bytes, 1))
    for start in range(0, shape[0], step):
        try:
            part = gguf.quants.dequantize(t.data[start:start + step], t.tensor_type)
            part = np.asarray(part, dtype=np.float32).reshape((-1, *shape[1:]))
        except Exception as e:
            raise GGUFImportError(f"{path}: cannot dequantize tensor {t.name} ({t.tensor_type.name}): {type(e).__name__}: {e}") from e
        if not np.isfinite(part).all():
            raise GGUFImportError(f"{path}: tensor {t.name} contains NaN/Inf after dequantization (corrupt data?)")
        yield _unpermute(part, permute_heads) if permute_heads else part


def _write_safetensors(f: BinaryIO, entries: list[tuple[str, tuple[int, ...]]], dtype: str) -> None:
    """Write only the header; tensor bytes follow in the same order (streamed by the caller)."""
    code, itemsize = _DTYPES[dtype][0], np.dtype(_DTYPES[dtype][1]).itemsize
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    f.write(struct.pack("<Q", len(blob)) + blob)


def _build_tokenizer(reader: Any, path: Path, max_len: int) -> tuple[Any, dict[str, Any]]:
    """Rebuild a byte-level BPE tokenizer (and tokenizer_config entries) from GGUF metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    kind = _meta(reader, path, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFImportError(f"{path}: unsupported tokenizer model {kind!r}; only 'gpt2' (byte-level BPE) is supported")
    tokens: list[str] = _meta(reader, path, "tokenizer.ggml.tokens")
    types: list[int] = _meta(reader, path, "tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in _meta(reader, path, "tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        logger.warning("%s: %d duplicate vocabulary strings; later ids win", path, len(tokens) - len(vocab))
    try:
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    except Exception as e:  # e.g. a merge that references a token missing from the vocabulary
        raise GGUFImportError(f"{path}: inconsistent BPE vocabulary/merges: {e}") from e
    pre = _meta(reader, path, "tokenizer.ggml.pre", "default")
    if pre == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_QWEN2_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    elif pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        if pre != "gpt-2":
            logger.warning("%s: pre-tokenizer %r not specifically supported; using GPT-2 byte-level regex", path, pre)
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    added = [AddedToken(t, special=ty == _TOKEN_CONTROL or (t.startswith("<|") and t.endswith("|>")), normalized=False)
             for t, ty in zip(tokens, types) if ty in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)]
    tok.add_tokens(added)

    def name(key: str) -> str | None:
        i = _meta(reader, path, f"tokenizer.ggml.{key}_token_id", None)
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos, eos = name("bos"), name("eos")
    add_bos = bool(_meta(reader, path, "tokenizer.ggml.add_bos_token", False))
    add_eos = bool(_meta(reader, path, "tokenizer.ggml.add_eos_token", False))
    post: list[Any] = [processors.ByteLevel(trim_offsets=False)]
    head, tail = [bos] if add_bos and bos else [], [eos] if add_eos and eos else []
    if head or tail:  # llama.cpp adds BOS/EOS itself; HF expects the tokenizer's post-processor to do it
        single = " ".join([*head, "$A", *tail])
        pair = " ".join([*head, "$A", *tail, "$B:1", *(f"{t}:1" for t in tail)])
        specials = [(t, vocab[t]) for t in dict.fromkeys(head + tail)]
        post.append(processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials))
    tok.post_processor = processors.Sequence(post)
    tok_cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos, "pad_token": name("padding"),
        "unk_token": name("unknown"), "add_bos_token": add_bos, "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False, "model_max_length": max_len,
        "chat_template": _meta(reader, path, "tokenizer.chat_template", None),
    }
    return tok, {k: v for k, v in tok_cfg.items() if v is not None}


def convert_gguf(gguf_path: Path, out_dir: Path, *, dtype: str = "float32", progress: bool = True) -> None:
    """Turn a GGUF file into a Hugging Face-layout model directory (no torch)."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    reader = _open_reader(gguf_path)
    by_name = {t.name: t for t in reader.tensors}
    cfg = _build_config(reader, gguf_path, by_name, dtype)
    tokenizer, tok_cfg = _build_tokenizer(reader, gguf_path, cfg["max_position_embeddings"])

    plan: list[tuple[Any, str, tuple[int, ...], int | None]] = []
    for t in reader.tensors:
        hf = _hf_name(t.name)
        if hf is None:
            if t.name in _IGNORABLE:
                logger.warning("%s: skipping %s (precomputed rope factors are not carried over)", gguf_path, t.name)
                continue
            raise GGUFImportError(f"{gguf_path}: unknown tensor {t.name!r} for architecture {cfg['model_type']!r}")
        shape = tuple(int(d) for d in reversed(t.shape))
        want = _expected_shape(hf, cfg)
        if shape != want:
            raise GGUFImportError(f"{gguf_path}: tensor {t.name} has shape {shape}, expected {want} for {hf}")
        heads = None
        if cfg["model_type"] == "llama" and ".self_attn.q_proj." in hf:
            heads = cfg["num_attention_heads"]
        elif cfg["model_type"] == "llama" and ".self_attn.k_proj." in hf:
            heads = cfg["num_key_value_heads"]
        plan.append((t, hf, shape, heads))
    written = {hf for _, hf, _, _ in plan}
    needed = {"model.embed_tokens.weight", "model.norm.weight"} | ({"lm_head.weight"} if not cfg["tie_word_embeddings"] else set())
    for n in range(cfg["num_hidden_layers"]):
        needed |= {f"model.layers.{n}.{v}.weight" for v in _BLOCK_NAMES.values()}
        if cfg["model_type"] == "qwen2":
            needed |= {f"model.layers.{n}.self_attn.{p}_proj.bias" for p in "qkv"}
    if missing := sorted(needed - written):
        raise GGUFImportError(f"{gguf_path}: missing {len(missing)} tensors, e.g. {missing[:3]}")

    with open(out_dir / "model.safetensors", "wb") as f:
        _write_safetensors(f, [(hf, shape) for _, hf, shape, _ in plan], dtype)
        for t, _, _, heads in tqdm(plan, desc=f"Converting {gguf_path.name}", unit="tensor", file=sys.stderr, disable=not progress):
            for part in _dequantized_chunks(t, gguf_path, heads):
                f.write(memoryview(_to_dtype(part, dtype)).cast("B"))

    tokenizer.save(str(out_dir / "tokenizer.json"))
    gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}
    for name, obj in (("config.json", cfg), ("tokenizer_config.json", tok_cfg), ("generation_config.json", gen)):
        (out_dir / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
