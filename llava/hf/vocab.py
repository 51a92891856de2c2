"""The ``<image>`` token that llava-hf checkpoints carry and upstream LLaVA's tokenizers lack.

Upstream LLaVA splices image features where ``tokenizer_image_token`` puts the id -200; llava-hf
instead adds ``<image>`` to the tokenizer (and ``<pad>`` when there is no pad token) and grows the
embeddings and ``lm_head`` to a multiple of 64 rows (``convert_llava_weights_to_hf.py``). It samples
the new rows near the mean row; here they are the mean row exactly, so that a new token can never
out-score every real one in ``lm_head`` (its logit is the mean logit) and greedy decoding picks the
same tokens as before the conversion. The ``<image>`` row of the embeddings is never read: its
positions are overwritten by image features.
"""

from __future__ import annotations

import math

import torch

IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
VOCAB_MULTIPLE = 64  # llava-hf's pad_shape


def add_image_token(tokenizer) -> int:
    """Add ``<image>`` (a special token, as llava-hf does) and ``<pad>`` when the tokenizer has no pad token.

    Returns the id of ``<image>``; a tokenizer that has it already keeps it.
    """
    from transformers import AddedToken

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens(AddedToken(IMAGE_TOKEN, special=True, normalized=False), special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def vocab_rows(num_tokens: int, rows: int) -> int:
    """Embedding rows for ``num_tokens`` tokens: ``rows`` if enough, else ``num_tokens`` rounded up to 64."""
    if num_tokens <= rows:
        return rows
    return math.ceil(num_tokens / VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def grow_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """``weight`` (V, D) with rows appended up to (rows, D); each new row is the mean of the first V."""
    extra = rows - weight.shape[0]
    if extra <= 0:
        return weight
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)  # (1, D)
    return torch.cat([weight, mean.expand(extra, -1)], dim=0)  # (rows, D)
