"""exo-speculative: speculative decoding for the Exo peer-to-peer LLM cluster.

Importing the package selects the CPU BLAS for MLX (see `exo.blas`): it has to happen
before anything imports `mlx.core`, and every entry point imports `exo` first.
"""

from exo.blas import select_blas

select_blas()

__version__ = "0.1.0"
