"""A BERT encoder's forward as its modules compute it, without transformers' wrappers.

An embedding model this small (MiniLM: 6 layers of 384) runs a short text in a few
milliseconds on a CPU, and a good part of that is Python: ``BertModel.forward`` passes
every layer through keyword plumbing, deprecation and checkpointing wrappers, the
attention and mask interfaces and output objects, and computes a pooler output that
sentence-transformers never reads. ``BertStack`` calls the same modules in the same
order (embeddings summed as ``BertEmbeddings`` sums them, each layer's attention
through torch's SDPA, its output and feed-forward with their own LayerNorms and
activation), with query, key and value in one multiply, and gives the last hidden
states within bfloat16 rounding of the model's own forward
(tests/integration/test_embedding_real_model.py). The encoder takes it for models
``BertStack.supports`` and the model's forward for any other architecture, and logs
which (services/embedding/encoder.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BertStack:
    """``stack(input_ids, mask)`` -> last hidden states (B, L, hidden); ``mask`` (B, L) with 1 for a text's
    tokens, or None where no row is padded (SDPA then takes no mask at all)."""

    def __init__(self, model: nn.Module):
        if not self.supports(model):
            raise ValueError(f"{type(model).__name__} is not a BERT encoder BertStack runs")
        self._embeddings = model.embeddings
        self._layers = list(model.encoder.layer)
        # Query, key and value of each layer in one weight: one multiply where the layer makes three.
        self._qkv = [(torch.cat([part.weight for part in parts]), torch.cat([part.bias for part in parts]))
                     for parts in ((layer.attention.self.query, layer.attention.self.key, layer.attention.self.value)
                                   for layer in self._layers)]

    @staticmethod
    def supports(model: nn.Module) -> bool:
        """A BertModel encoder (not a decoder, absolute positions) with its layers as transformers builds them."""
        config = getattr(model, "config", None)
        return (config is not None and getattr(config, "model_type", "") == "bert"
                and not config.is_decoder and not getattr(config, "add_cross_attention", False)
                and getattr(config, "position_embedding_type", "absolute") == "absolute"
                and getattr(config, "chunk_size_feed_forward", 0) == 0
                and hasattr(model, "embeddings") and hasattr(model, "encoder"))

    def __call__(self, input_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        embeddings = self._embeddings
        batch, length = input_ids.shape
        # BertEmbeddings: words + token types (all type 0 here) + positions, then its LayerNorm.
        hidden = embeddings.word_embeddings(input_ids) + embeddings.token_type_embeddings.weight[0]
        hidden = hidden + embeddings.position_embeddings(embeddings.position_ids[:, :length])
        hidden = embeddings.LayerNorm(hidden)
        keep = None if mask is None else mask[:, None, None, :].bool()  # (B, 1, 1, L): which keys each row sees
        for layer, (qkv_weight, qkv_bias) in zip(self._layers, self._qkv):
            attention = layer.attention.self
            head_dim = attention.attention_head_size
            qkv = F.linear(hidden, qkv_weight, qkv_bias).view(batch, length, 3, -1, head_dim)
            query, key, value = (qkv[:, :, part].transpose(1, 2) for part in range(3))
            attended = F.scaled_dot_product_attention(query, key, value, attn_mask=keep, scale=attention.scaling)
            attended = attended.transpose(1, 2).reshape(batch, length, -1)
            output = layer.attention.output
            hidden = output.LayerNorm(output.dense(attended) + hidden)
            intermediate = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(hidden))
            output = layer.output
            hidden = output.LayerNorm(output.dense(intermediate) + hidden)
        return hidden
