"""Reference PyTorch BERT that loads Hugging Face checkpoints; config flags pick fused bertkern.ops paths."""
from bertkern.models.bert import (
    BertAttention,
    BertConfig,
    BertEmbeddings,
    BertEncoder,
    BertForSequenceClassification,
    BertIntermediate,
    BertLayer,
    BertModel,
    BertModelOutput,
    BertOutput,
    BertPooler,
    BertSelfAttention,
    BertSelfOutput,
    SequenceClassifierOutput,
)

__all__ = [
    "BertAttention",
    "BertConfig",
    "BertEmbeddings",
    "BertEncoder",
    "BertForSequenceClassification",
    "BertIntermediate",
    "BertLayer",
    "BertModel",
    "BertModelOutput",
    "BertOutput",
    "BertPooler",
    "BertSelfAttention",
    "BertSelfOutput",
    "SequenceClassifierOutput",
]
