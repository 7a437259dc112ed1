"""A batched KV cache in which every row (episode) owns an arbitrary set of slots.

All rows share one time axis of slots. A row's real tokens sit in increasing slot order,
and the slots it does not own are masked out, so rows of different lengths, with gaps
between turns, live in one batch. Each forward appends a block of slots to every row;
`compact` gathers each row's real slots to the right end of a fresh buffer (dropping
gaps and retired rows, adding new rows), which keeps the cache dense between turns.

Buffers are preallocated and grow geometrically, so a decode step writes one slot in
place instead of concatenating the whole cache (HF's DynamicCache copies it every step).

`packed_gqa_attention` is the attention function the engine installs: grouped-query
attention that folds the query groups into the query length instead of repeating the
key/value heads, so the cache is read once per step, not once per query head.
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
    """SDPA with a boolean (B, 1, S, T) mask; the G query heads of a KV head share its keys."""
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


class SlotCache(Cache):
    """Per-layer buffers (B, H_kv, capacity, D), slot ownership `valid` (B, capacity) and
    each row's next position id. `length` slots are in use."""

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, dtype, device, capacity: int = 256):
        super().__init__(layers=[])
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.dtype, self.device = dtype, device
        shape = (batch, kv_heads, capacity, head_dim)
        # Slots are always written before they are read (masked slots included), so no zeroing.
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.length = 0

    @property
    def batch(self) -> int:
        return self.valid.shape[0]

    @property
    def capacity(self) -> int:
        return self.valid.shape[1]

    # --- HF Cache interface ------------------------------------------------------------

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        start, end = self.length, self.length + key_states.shape[2]
        self.keys[layer_idx][:, :, start:end] = key_states
        self.values[layer_idx][:, :, start:end] = value_states
        if layer_idx == self.num_layers - 1:
            self.length = end
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    # --- engine interface --------------------------------------------------------------

    def _grow(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        new_cap = max(needed, int(self.capacity * 1.5) + 64)
        pad = new_cap - self.capacity
        for buffers in (self.keys, self.values):
            for i, t in enumerate(buffers):
                buffers[i] = torch.cat([t, t.new_empty(t.shape[0], t.shape[1], pad, t.shape[3])], dim=2)
        self.valid = torch.cat([self.valid, self.valid.new_zeros(self.batch, pad)], dim=1)

    def begin_block(self, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reserve a block of S slots; `real` (B, S) marks which of them hold real tokens.

        Returns the position ids (B, S) and the boolean attention mask (B, 1, S, length+S):
        a real token sees its row's earlier real tokens and itself; a padding token sees only
        itself (so no attention row is empty), and no token ever sees a padding slot.
        """
        s = real.shape[1]
        self._grow(self.length + s)
        start, end = self.length, self.length + s
        self.valid[:, start:end] = real
        pos = self.next_pos[:, None] + real.long().cumsum(1) - 1
        pos = pos.clamp(min=0)
        self.next_pos += real.sum(1)
        causal = torch.ones(s, s, dtype=torch.bool, device=self.device).tril()
        block = causal[None] & real[:, None, :]
        block |= torch.eye(s, dtype=torch.bool, device=self.device)[None]
        past = self.valid[:, None, :start].expand(-1, s, -1)
        mask = torch.cat([past, block], dim=2)[:, None]
        return pos, mask

    def compact(self, sources: list[tuple[SlotCache, int]]) -> SlotCache:
        """A dense new cache whose row i is row `sources[i][1]` of cache `sources[i][0]`.

        Each row's real slots are gathered, in order, to the right end of the new buffer.
        """
        by_cache: dict[int, list[int]] = {}
        for i, (c, _) in enumerate(sources):
            by_cache.setdefault(id(c), []).append(i)
        plans = []
        for idxs in by_cache.values():
            cache = sources[idxs[0]][0]
            rows = torch.tensor([sources[i][1] for i in idxs], device=self.device)
            valid = cache.valid[rows, : cache.length]
            plans.append((cache, rows, torch.tensor(idxs, device=self.device), valid, valid.sum(1)))
        width = max((int(p[4].max()) for p in plans if len(p[4])), default=0)
        out = SlotCache(
            self.num_layers, len(sources), self.kv_heads, self.head_dim, self.dtype, self.device, capacity=width + 64
        )
        out.length = width
        col = torch.arange(width, device=self.device)[None]
        heads = torch.arange(self.kv_heads, device=self.device)[None, :, None]
        for cache, rows, dest, valid, counts in plans:
            # Slot of each row's k-th real token, right-aligned into `width` columns.
            order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
            shift = (width - counts)[:, None]  # leading empty columns per row
            slots = order.gather(1, (col - shift).clamp(min=0, max=max(cache.length - 1, 0)))
            out.valid[dest, :width] = col >= shift
            out.next_pos[dest] = cache.next_pos[rows]
            index = (rows[:, None, None], heads, slots[:, None, :])
            for layer in range(self.num_layers):
                out.keys[layer][dest, :, :width] = cache.keys[layer][index]
                out.values[layer][dest, :, :width] = cache.values[layer][index]
        return out

    def select(self, rows: list[int], spare: int = 0) -> SlotCache:
        """A copy of some rows with the same slot layout, with room for `spare` more slots."""
        index = torch.tensor(rows, device=self.device)
        out = SlotCache(
            self.num_layers, len(rows), self.kv_heads, self.head_dim, self.dtype, self.device, self.length + spare
        )
        out.length = self.length
        out.valid[:, : self.length] = self.valid[index, : self.length]
        out.next_pos = self.next_pos[index].clone()
        for layer in range(self.num_layers):
            out.keys[layer][:, :, : self.length] = self.keys[layer][index, :, : self.length]
            out.values[layer][:, :, : self.length] = self.values[layer][index, :, : self.length]
        return out

    def write_back(self, part: SlotCache, rows: list[int]) -> None:
        """Append the slots `part` (made by `select(rows)`) gained since, for those rows only.

        The other rows get the same number of empty slots; `compact` removes such gaps.
        """
        start, added = self.length, part.length - self.length
        self._grow(start + added)
        index = torch.tensor(rows, device=self.device)
        self.valid[:, start : start + added] = False
        self.valid[index, start : start + added] = part.valid[:, start : part.length]
        self.next_pos[index] = part.next_pos
        for layer in range(self.num_layers):
            for mine, theirs in ((self.keys[layer], part.keys[layer]), (self.values[layer], part.values[layer])):
                mine[:, :, start : start + added] = 0  # masked, but must not hold NaN garbage
                mine[index, :, start : start + added] = theirs[:, :, start : part.length]
        self.length = start + added

    def replace_row(self, row: int, source: SlotCache) -> None:
        """Make `row` hold row 0 of `source` (e.g. a shared prefix), in the last slots in use."""
        n = source.length
        if n > self.length:  # grow with empty slots so the source fits before the end
            self._grow(n)
            for buffers in (self.keys, self.values):
                for t in buffers:
                    t[:, :, self.length : n] = 0
            self.valid[:, self.length : n] = False
            self.length = n
        start = self.length - n
        self.valid[row] = False
        self.valid[row, start : self.length] = source.valid[0, :n]
        self.next_pos[row] = source.next_pos[0]
        for layer in range(self.num_layers):
            self.keys[layer][row, :, start : self.length] = source.keys[layer][0, :, :n]
            self.values[layer][row, :, start : self.length] = source.values[layer][0, :, :n]

    def real_lengths(self) -> torch.Tensor:
        return self.valid[:, : self.length].sum(1)

    @classmethod
    def for_model(cls, config, batch: int, dtype, device, capacity: int = 256) -> SlotCache:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_hidden_layers, batch, config.num_key_value_heads, head_dim, dtype, device, capacity)
