"""Prefill attention in fixed query tiles, so a query row's bits do not depend on the prompt's length.

torch's CPU flash attention splits the queries into blocks whose size it picks
from the query count, and with bfloat16 it also picks from it whether to pack
its operands for the bfloat16 matrix units (AMX, where present). A prompt's tail
prefilled after a reused prefix has fewer queries than the whole prompt, so
without tiles its rows could round unlike the same rows of a cold prefill. Here a
prefill's queries are cut into tiles of ``TILE_ROWS`` (placed as
services/inference/tiles.py says), the tiles go as the batch of one
``scaled_dot_product_attention`` call over the same keys, and every tile is the
same computation however many there are.

Whether a forward is a prefill, and where its rows go in the tiles, is the model's
``KernelPlan``'s to say (services/inference/kernel_plan.py): ``use_tiled_attention``
gives each attention module its model's plan. Decode (one query per sequence,
outside a prefill) takes transformers' own SDPA path: each sequence is its own
batch item there, and KV widths aligned (services/inference/kv.py) keep a row's
bits the same alone or in a batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from services.inference.kernel_plan import ATTRIBUTE, KernelPlan
from services.inference.tiles import TILE_ROWS, tile_count

NAME = "nlpmesh_tiled_sdpa"


def tiled_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: query (1, heads, n, dim), key and value (1, kv_heads, width, dim),
    a 4-D boolean mask (1, 1, n, width); returns (1, n, heads, dim), tiled as ``module``'s plan says.
    Other calls go to plain SDPA."""
    plan: KernelPlan = getattr(module, ATTRIBUTE)
    tiled = plan.prefilling or query.shape[2] > 1  # a one-token tail after a reused prefix is a prefill too
    if not tiled or query.shape[0] != 1 or attention_mask is None or attention_mask.dim() != 4 \
            or attention_mask.shape[1] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    return prefill_attention(query, key, value, attention_mask, plan.tile_offset(TILE_ROWS), dropout, scaling), None


def prefill_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor,
                      offset: int, dropout: float = 0.0, scaling: float | None = None) -> torch.Tensor:
    """One prefill's attention in ``TILE_ROWS``-query tiles, the first query at row ``offset`` of the first
    tile: query (1, heads, n, dim), key and value (1, kv_heads, width, dim), a 4-D boolean mask
    (1, 1, n, width); returns (1, n, heads, dim)."""
    rows = query.shape[2]
    heads, dim, width = query.shape[1], query.shape[3], key.shape[2]
    tiles = tile_count(offset, rows, TILE_ROWS)
    total = tiles * TILE_ROWS
    padded = query.new_zeros(1, heads, total, dim)
    padded[:, :, offset : offset + rows] = query
    mask = attention_mask[:, :1, :1].expand(1, 1, total, width).clone()  # padding rows: a valid mask, ignored
    mask[:, :, offset : offset + rows] = attention_mask[:, :1]
    groups = heads // key.shape[1]
    keys = repeat_kv(key, groups).expand(tiles, -1, -1, -1)
    values = repeat_kv(value, groups).expand(tiles, -1, -1, -1)
    output = F.scaled_dot_product_attention(
        padded.view(heads, tiles, TILE_ROWS, dim).transpose(0, 1),  # (tiles, heads, TILE_ROWS, dim)
        keys, values, attn_mask=mask.view(tiles, 1, TILE_ROWS, width), dropout_p=dropout, scale=scaling,
    )
    output = output.transpose(1, 2).reshape(1, total, heads, dim)[:, offset : offset + rows]
    return output.contiguous()


AttentionInterface.register(NAME, tiled_sdpa_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)  # masks as for SDPA; a 4-D mask passes as given


def use_tiled_attention(model: nn.Module, plan: KernelPlan) -> None:
    """Makes ``model`` (a transformers model) attend through ``tiled_sdpa_attention``, tiled as ``plan`` says."""
    if not hasattr(model, "set_attn_implementation"):
        return
    model.set_attn_implementation(NAME)
    for module in model.modules():
        if hasattr(module, "head_dim") and hasattr(module, "layer_idx"):  # an attention module
            setattr(module, ATTRIBUTE, plan)
