"""Drop-in nn.Modules over bertkern.ops, and BERT's fused blocks over existing Linear / LayerNorm
modules (bertkern.models and bertkern.optimize both call these)."""
from bertkern.nn.bias_gelu import BiasGELU, linear_bias_gelu
from bertkern.nn.layer_norm import FusedAddLayerNorm, FusedEmbeddingLayerNorm, FusedLayerNorm, linear_add_layer_norm
from bertkern.nn.masked_softmax import MaskedSoftmax

__all__ = ["BiasGELU", "FusedAddLayerNorm", "FusedEmbeddingLayerNorm", "FusedLayerNorm", "MaskedSoftmax",
           "linear_add_layer_norm", "linear_bias_gelu"]
