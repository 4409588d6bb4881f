"""bertkern: fused Triton and CUDA kernels for BERT-style encoders."""
from bertkern import ops  # noqa: F401  (registers the torch.ops.bertkern custom ops)
from bertkern import nn  # noqa: F401
from bertkern.optimize import OptimizeReport, optimize, optimize_report, optimized, restore  # noqa: F401

__version__ = "0.1.0"
