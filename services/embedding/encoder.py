"""A sentence-transformers folder run in plain torch: the transformer, its pooling and normalisation.

What sentence-transformers does for the same folder (modules.json: Transformer, Pooling, Normalize), without
depending on it: the tokenizer gives ids, one forward gives the last hidden states, the pooling config says
mean, CLS or max over the text's tokens, and a Normalize module makes each vector unit length.
The weights run in float32 or, where the CPU multiplies bfloat16 natively, bfloat16 (``resolve_precision``;
within cosine 0.999 of sentence-transformers either way: tests/integration/test_embedding_real_model.py).
Texts are tokenized apart (``tokenize``: counted and checked against the limit before they queue) and
forwarded together (``embed``): sorted by length and padded only to the longest of their forward.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as hf_logging

from meshkit.cpu_features import CpuFeatures, read_cpu_features
from modelfiles.embedding import max_seq_length
from services.embedding.bert import BertStack

_POOLINGS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max"}


class TextTooLong(ValueError):
    """Texts over the model's token limit: their indices and token counts."""

    def __init__(self, over: list[tuple[int, int]], limit: int):
        super().__init__(f"{len(over)} text(s) over the {limit}-token limit")
        self.over = over
        self.limit = limit


@dataclass(frozen=True)
class Pooling:
    mode: str  # mean, cls or max
    normalize: bool


def read_pooling(folder: Path) -> Pooling:
    """The folder's pooling and whether it normalises, from modules.json and the pooling module's config."""
    modules = json.loads((folder / "modules.json").read_text())
    types = [module.get("type", "") for module in modules]
    pooling_path = next((module.get("path", "") for module in modules if module.get("type", "").endswith(".Pooling")),
                        None)
    if pooling_path is None:
        raise ValueError(f"{folder}: modules.json has no Pooling module")
    config = json.loads((folder / pooling_path / "config.json").read_text())
    modes = [mode for key, mode in _POOLINGS.items() if config.get(key)]
    others = [key for key, on in config.items() if key.startswith("pooling_mode_") and on and key not in _POOLINGS]
    if len(modes) != 1 or others:
        raise ValueError(f"{folder}: pooling {sorted(k for k, on in config.items() if on is True)} is not one of "
                         f"mean, cls or max")
    return Pooling(modes[0], any(kind.endswith(".Normalize") for kind in types))


PRECISIONS = ("auto", "float32", "bfloat16")


def resolve_precision(precision: str, features: CpuFeatures) -> str:
    """``auto``: bfloat16 where the CPU multiplies it natively (AMX-BF16 or AVX-512 BF16), else float32 (an
    AVX2-only CPU would emulate bfloat16, slower than float32). Pooling and normalising stay float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    return "bfloat16" if features.amx_bf16 or features.avx512_bf16 else "float32"


class SentenceEncoder:
    def __init__(self, folder: Path, max_tokens: int | None = None, max_batch_texts: int = 32, threads: int = 0,
                 precision: str = "auto"):
        self.folder = folder
        self.pooling = read_pooling(folder)
        self.precision = resolve_precision(precision, read_cpu_features())
        hf_logging.disable_progress_bar()  # its bars on stderr would break a JSON log's lines
        self._tokenizer = AutoTokenizer.from_pretrained(folder)
        self._model = AutoModel.from_pretrained(folder, dtype=getattr(torch, self.precision)).eval()
        position_limit = getattr(self._model.config, "max_position_embeddings", 512)
        self.max_tokens = min(max_tokens or max_seq_length(folder) or position_limit, position_limit)
        self.dimensions = int(self._model.config.hidden_size)
        self.max_batch_texts = max_batch_texts
        self._pad_id = self._tokenizer.pad_token_id or 0
        self._token_types = "token_type_ids" in self._tokenizer.model_input_names
        # A BERT encoder runs without transformers' wrappers (services/embedding/bert.py); any other, its forward.
        self._stack = BertStack(self._model) if BertStack.supports(self._model) else None
        self.forward_path = "BertStack" if self._stack is not None else f"{type(self._model).__name__}.forward"
        self.threads = threads or len(os.sched_getaffinity(0))

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Each text's ids with the special tokens; ``TextTooLong`` naming every text over the limit."""
        ids = self._tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        over = [(index, len(one)) for index, one in enumerate(ids) if len(one) > self.max_tokens]
        if over:
            raise TextTooLong(over, self.max_tokens)
        return ids

    @torch.inference_mode()
    def embed(self, ids: list[list[int]]) -> torch.Tensor:
        """One vector per text (float32, [len(ids), dimensions]), in the order given."""
        if torch.get_num_threads() != self.threads:  # a thread's own setting (OpenMP's): the worker's first call
            torch.set_num_threads(self.threads)
        order = sorted(range(len(ids)), key=lambda index: len(ids[index]))
        out = torch.empty(len(ids), self.dimensions, dtype=torch.float32)
        for start in range(0, len(order), self.max_batch_texts):
            chunk = order[start:start + self.max_batch_texts]
            out[chunk] = self._forward([ids[index] for index in chunk])
        return out

    def _forward(self, ids: list[list[int]]) -> torch.Tensor:
        longest = max(len(one) for one in ids)
        input_ids = torch.full((len(ids), longest), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), longest), dtype=torch.long)
        for row, one in enumerate(ids):
            input_ids[row, :len(one)] = torch.tensor(one, dtype=torch.long)
            mask[row, :len(one)] = 1
        if self._stack is not None:
            padded = any(len(one) != longest for one in ids)
            hidden = self._stack(input_ids, mask if padded else None).float()
        else:
            extra = {"token_type_ids": torch.zeros_like(input_ids)} if self._token_types else {}
            hidden = self._model(input_ids=input_ids, attention_mask=mask, **extra).last_hidden_state.float()
        if self.pooling.mode == "cls":
            pooled = hidden[:, 0]
        elif self.pooling.mode == "max":
            pooled = hidden.masked_fill(mask.unsqueeze(-1) == 0, float("-inf")).amax(dim=1)
        else:
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1) if self.pooling.normalize else pooled
