"""Drop-in nn.Modules over bertkern.ops."""
from bertkern.nn.bias_gelu import BiasGELU
from bertkern.nn.layer_norm import FusedAddLayerNorm, FusedEmbeddingLayerNorm, FusedLayerNorm
from bertkern.nn.masked_softmax import MaskedSoftmax

__all__ = ["BiasGELU", "FusedAddLayerNorm", "FusedEmbeddingLayerNorm", "FusedLayerNorm", "MaskedSoftmax"]
