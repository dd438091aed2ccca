"""Random-access training windows over one split's concatenated token stream.

The stream is every document's tokens followed by `<|endoftext|>`, documents in record order. With
the cumulative document lengths, window i (tokens [i*(seq_len+1), (i+1)*(seq_len+1)) of the stream)
is a slice that reads only the one to few documents it overlaps, so the windows form a plain
indexable sequence that grain can shuffle, shard and checkpoint by index alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from backpack_jax.tokenizer import EOT_ID
from train.text_dataset import TOKENS

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class TokenStream:
    """One split as a single token stream.

    `doc_starts_n1[d]` is where document d starts in the stream (its tokens, then EOT);
    the last entry is the stream length.
    """

    documents: Sequence[Mapping[str, np.ndarray]]
    doc_starts_n1: np.ndarray

    @classmethod
    def from_lengths(cls, documents: Sequence[Mapping[str, np.ndarray]],
                     doc_lengths: np.ndarray) -> TokenStream:
        if len(doc_lengths) != len(documents):
            raise ValueError(f"{len(doc_lengths)} document lengths for {len(documents)} documents")
        starts = np.zeros(len(doc_lengths) + 1, dtype=np.int64)
        np.cumsum(np.asarray(doc_lengths, dtype=np.int64) + 1, out=starts[1:])
        return cls(documents, starts)

    @property
    def n_tokens(self) -> int:
        return int(self.doc_starts_n1[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the stream as int32."""
        first = int(np.searchsorted(self.doc_starts_n1, start, side="right")) - 1
        last = int(np.searchsorted(self.doc_starts_n1, stop, side="left"))
        pieces = []
        for doc in range(first, last):
            pieces += [self.documents[doc][TOKENS], [EOT_ID]]
        offset = int(self.doc_starts_n1[first])
        return np.concatenate(pieces).astype(np.int32)[start - offset:stop - offset]


@dataclasses.dataclass(frozen=True)
class Windows:
    """Non-overlapping windows of `seq_len + 1` tokens; a tail shorter than a window is dropped."""

    stream: TokenStream
    seq_len: int

    def __len__(self) -> int:
        return self.stream.n_tokens // (self.seq_len + 1)

    def __call__(self, index: int) -> Batch:
        """Window `index` as next-token prediction pairs, each int32[seq_len]."""
        start = index * (self.seq_len + 1)
        window = self.stream.read(start, start + self.seq_len + 1)
        return {"inputs": window[:-1], "targets": window[1:]}
