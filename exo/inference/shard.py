"""A contiguous layer range of a model, as upstream Exo names it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shard:
    """Layers `start_layer..end_layer` (inclusive) of a model with `n_layers` layers."""

    model_id: str
    start_layer: int
    end_layer: int
    n_layers: int

    def __post_init__(self) -> None:
        if not 0 <= self.start_layer <= self.end_layer < self.n_layers:
            raise ValueError(
                f"invalid shard {self.model_id}[{self.start_layer}..{self.end_layer}] "
                f"of a {self.n_layers}-layer model"
            )

    @classmethod
    def full(cls, model_id: str, n_layers: int) -> "Shard":
        return cls(model_id, 0, n_layers - 1, n_layers)

    def is_first_layer(self) -> bool:
        return self.start_layer == 0

    def is_last_layer(self) -> bool:
        return self.end_layer == self.n_layers - 1

    def get_layer_count(self) -> int:
        return self.end_layer - self.start_layer + 1

    def split(self, parts: int) -> list["Shard"]:
        """Cut this shard into `parts` near-equal consecutive shards (tests, rings)."""
        count = self.get_layer_count()
        if not 1 <= parts <= count:
            raise ValueError(f"cannot split {count} layers into {parts} shards")
        bounds = [self.start_layer + round(i * count / parts) for i in range(parts + 1)]
        return [Shard(self.model_id, a, b - 1, self.n_layers) for a, b in zip(bounds, bounds[1:])]


def place_checkpoint_key(key: str, shard: Shard) -> tuple[int | None, str] | None:
    """Where a Hugging Face checkpoint tensor goes in `shard`: (block index within the shard,
    name inside the block) for a transformer block's tensor, (None, name) for one outside the
    blocks (embedding, final norm, head), None for one this shard does not hold."""
    if "rotary_emb.inv_freq" in key:
        return None
    name = key.removeprefix("model.")
    if not name.startswith("layers."):
        return None, name
    index, rest = name[len("layers."):].split(".", 1)
    if shard.start_layer <= int(index) <= shard.end_layer:
        return int(index) - shard.start_layer, rest
    return None
