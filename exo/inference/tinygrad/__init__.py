"""The tinygrad engine: llama/qwen2-family shards on tinygrad's tensor API (CPU or GPU)."""
