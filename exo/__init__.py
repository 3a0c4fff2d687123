"""exo-speculative: speculative decoding for the Exo peer-to-peer LLM cluster.

Importing the package selects the CPU BLAS for MLX (see `exo.blas`): it has to happen
before anything imports `mlx.core`, and every entry point imports `exo` first. It only
loads what is there (exo's few-row kernel if `make setup` or an `exo` command built it):
no compiler, no subprocess, no output.
"""

from exo.blas import select_blas

select_blas()

__version__ = "0.1.0"
