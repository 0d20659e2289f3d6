"""Packing: documents' tokens into full sequences, so no token is cut off by truncation.

The documents' tokens (no special tokens) are joined by [SEP] into one stream, a carry from earlier
documents first, and cut every `max_length - 2` tokens; each piece becomes
`[CLS] piece [SEP]`, exactly `max_length` tokens. A long document continues in the next sequence.
What is left after the last full sequence (fewer than `max_length - 2` tokens) is the carry: a
stream starts its next sequence with it; an in-memory corpus drops it (at most one sequence's worth
of tokens, once). Attention is not blocked between documents of one sequence: BERT and RoBERTa
pretrain the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from typing import Any

import numpy as np

DTYPE = np.int32  # token ids; vocabularies of BERT-style encoders are far below 2**31
TOKENIZE_BATCH = 256  # texts per batched tokenizer call


def pack(
    docs: Sequence[Sequence[int]], length: int, cls: int, sep: int, carry: Sequence[int] = ()
) -> tuple[np.ndarray, list[int]]:
    """(`[n, length]` sequences, the carry): `carry` and `docs` joined by `sep`, cut into full
    sequences. Empty documents add nothing (no doubled [SEP])."""
    body = length - 2
    parts: list[Sequence[int]] = [carry] if len(carry) else []
    for doc in docs:
        if len(doc):
            parts += [(sep,), doc] if parts else [doc]
    flat = np.fromiter(chain.from_iterable(parts), dtype=DTYPE)
    n = len(flat) // body
    pieces = flat[: n * body].reshape(n, body)
    ends = np.full((n, 1), cls, DTYPE), np.full((n, 1), sep, DTYPE)
    return np.concatenate([ends[0], pieces, ends[1]], axis=1), flat[n * body :].tolist()


def unpack(seqs: np.ndarray, carry: Sequence[int] = ()) -> list[int]:
    """The token stream `pack` cut: the sequences without their [CLS] and [SEP], then the carry
    (the inverse, for tests and checks)."""
    return [*np.asarray(seqs)[:, 1:-1].reshape(-1).tolist(), *carry]


def pack_texts(
    tokenizer: Any, texts: Sequence[str], length: int, carry: Sequence[int] = ()
) -> tuple[np.ndarray, list[int]]:
    """`pack` of the texts' tokens, tokenised in batched calls of TOKENIZE_BATCH texts."""
    parts, left = [np.zeros((0, length), DTYPE)], list(carry)
    for i in range(0, len(texts), TOKENIZE_BATCH):
        chunk = list(texts[i : i + TOKENIZE_BATCH])
        ids = tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
        seqs, left = pack(ids, length, tokenizer.cls_token_id, tokenizer.sep_token_id, left)
        parts.append(seqs)
    return np.concatenate(parts), left
