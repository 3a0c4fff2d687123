"""Sharded MLX engine built on mlx-lm's model classes."""
