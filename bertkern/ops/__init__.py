"""Public functional ops. Each takes backend=None|"auto"|"torch"|"triton"|"cuda"."""
from bertkern.ops.attention import attention, attention_varlen
from bertkern.ops.bias_gelu import bias_gelu
from bertkern.ops.layer_norm import add_layer_norm, embedding_layer_norm
from bertkern.ops.masked_softmax import masked_softmax

__all__ = ["add_layer_norm", "attention", "attention_varlen", "bias_gelu", "embedding_layer_norm", "masked_softmax"]
