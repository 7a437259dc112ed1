"""A batched KV cache in which row i holds its episode's tokens in slots [0, n_i).

Rows grow at their own pace. A forward writes a block of S slots at each row's own end
(`begin_block`); afterwards the engine `commit`s how many of them each row keeps. Slots past
a row's length are free: padding and rejected draft tokens are overwritten by the row's next
block. So a row never holds gaps, nothing is compacted, and a finished row is reused by
copying another episode's prefix into it (`set_row`). Position ids are slot indices.

Buffers (B, H_kv, capacity, D) per layer are preallocated and grow geometrically, so a block
is written in place instead of concatenating the whole cache (HF's DynamicCache copies it).

`packed_gqa_attention` is the attention function the engine installs: grouped-query
attention that folds the query groups into the query length instead of repeating the
key/value heads, so the cache is read once per forward, not once per query head.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache

ATTENTION_NAME = "fedse_packed_gqa"


def packed_gqa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA with a (B, 1, S, T) mask; the G query heads of a KV head share its keys."""
    b, hq, s, d = query.shape
    hkv = key.shape[1]
    groups = hq // hkv
    if groups > 1:
        query = query.reshape(b, hkv, groups * s, d)
        if attention_mask is not None:
            attention_mask = attention_mask.repeat(1, 1, groups, 1)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling
    )
    return out.reshape(b, hq, s, d).transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION_NAME, packed_gqa_attention)


class RowCache(Cache):
    """Per-layer buffers (B, H_kv, capacity, D) and each row's length (B,)."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, dtype, device, capacity: int = 256):
        super().__init__(layers=[])
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.dtype, self.device = dtype, device
        shape = (batch, kv_heads, capacity, head_dim)
        # Zeros, not empty: attention reads free slots under a mask, and NaN garbage there
        # would poison the softmax.
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self._block: tuple[torch.Tensor, torch.Tensor, int] | None = None  # rows, slots, span of the open block

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    # --- HF Cache interface ------------------------------------------------------------

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.lengths.max()) if self.batch else 0

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        rows, slots, span = self._block
        self.keys[layer_idx][rows, :, slots] = key_states.transpose(1, 2)
        self.values[layer_idx][rows, :, slots] = value_states.transpose(1, 2)
        return self.keys[layer_idx][:, :, :span], self.values[layer_idx][:, :, :span]

    # --- engine interface --------------------------------------------------------------

    def begin_block(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Reserve `width` slots at every row's end.

        Returns the position ids (B, S) and the additive attention mask (B, 1, S, T), T the
        longest row's end: the token in a row's slot p sees that row's slots 0..p. Padding
        at a row's block end sees the row too (no attention row is empty), and no real
        token sees it, since it comes later in the row.
        """
        slots = self.lengths[:, None] + torch.arange(width, device=self.device)[None]
        span = int(self.lengths.max()) + width
        self._grow(span)
        self._block = (torch.arange(self.batch, device=self.device)[:, None], slots, span)
        visible = torch.arange(span, device=self.device)[None, None, :] <= slots[:, :, None]
        # An additive mask, made once here: SDPA would convert a boolean one in every layer,
        # a cost results/measurements.md records.
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device).masked_fill_(~visible, float("-inf"))
        return slots, mask[:, None]

    def commit(self, lengths: list[int]) -> None:
        """Set every row's length after a block (real tokens kept; the rest is free again)."""
        self.lengths = torch.tensor(lengths, dtype=torch.long, device=self.device)
        self._block = None

    def _grow(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        new_cap = max(needed, int(self.capacity * 1.5) + 64)
        for buffers in (self.keys, self.values):
            for i, t in enumerate(buffers):  # one layer at a time, to keep the transient small
                grown = t.new_zeros(t.shape[0], t.shape[1], new_cap, t.shape[3])
                grown[:, :, : t.shape[2]] = t
                buffers[i] = grown

    def set_row(self, row: int, source: RowCache, source_row: int = 0) -> None:
        """Make `row` hold a copy of `source`'s row (e.g. a shared prefix)."""
        n = int(source.lengths[source_row])
        self._grow(n)
        for mine, theirs in zip(self.keys + self.values, source.keys + source.values, strict=True):
            mine[row, :, :n] = theirs[source_row, :, :n]
        self.lengths[row] = n

    def pack(self, live: list[int]) -> list[int]:
        """Drop every row not in `live`, in place: live rows past the new batch size move into
        the dropped rows' places (only they are copied), then the batch is cut to `len(live)`.

        Returns the old row index now at each new row.
        """
        n = len(live)
        order = list(range(n))
        kept = set(live)
        holes = [i for i in range(n) if i not in kept]
        movers = [i for i in live if i >= n]
        for hole, mover in zip(holes, movers, strict=True):
            self.set_row(hole, self, mover)
            order[hole] = mover
        self.keys = [t[:n] for t in self.keys]
        self.values = [t[:n] for t in self.values]
        self.lengths = self.lengths[:n].clone()
        return order

    @classmethod
    def for_model(cls, config, batch: int, dtype, device, capacity: int = 256) -> RowCache:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_hidden_layers, batch, config.num_key_value_heads, head_dim, dtype, device, capacity)
