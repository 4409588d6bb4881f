"""Public functional ops. Each takes backend=None|"auto"|"torch"|"triton"|"cuda"."""
from bertkern.ops.bias_gelu import bias_gelu

__all__ = ["bias_gelu"]
