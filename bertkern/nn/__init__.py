"""Drop-in nn.Modules over bertkern.ops."""
from bertkern.nn.bias_gelu import BiasGELU

__all__ = ["BiasGELU"]
