"""mlx-dp: a YAML-driven data-parallel fine-tuning framework on MLX.

The package keeps its top level free of MLX imports so that the CLI can read
a recipe (and load the optional OpenBLAS shim, see ``trainer.tools.fastblas``)
before ``mlx.core`` is loaded.
"""

__version__ = "0.1.0"
