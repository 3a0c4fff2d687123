"""A model cut to its first layers, as a draft: same weights and tokenizer, no download.

A target with no small sibling can still be paired with a weaker, cheaper version of
itself; tests and benchmarks use it as a real draft that disagrees with its target.
"""

from __future__ import annotations

import json
from pathlib import Path


def make_early_exit(source: Path, path: Path, layers: int) -> Path:
    """`source` cut to its first `layers` layers in `path`: its files linked, and a config
    that says fewer layers (loaders then read only those layers' weights)."""
    config = json.loads((source / "config.json").read_text())
    if not 0 < layers <= config["num_hidden_layers"]:
        raise ValueError(f"{source} has {config['num_hidden_layers']} layers; cannot keep {layers}")
    path.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name != "config.json":
            (path / item.name).symlink_to(item)
    config["num_hidden_layers"] = layers
    (path / "config.json").write_text(json.dumps(config))
    return path
