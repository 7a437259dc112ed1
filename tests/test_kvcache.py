"""The row cache: each row's tokens in slots [0, n), blocks written at each row's own end."""

import torch

from fedse.agent.kvcache import RowCache
from fedse.agent.lookup import PromptLookup


def filled_cache(lengths: list[int]) -> RowCache:
    """A one-layer cache whose row r, slot s holds the value 1000 r + s in every key and value."""
    cache = RowCache(1, len(lengths), kv_heads=2, head_dim=3, dtype=torch.float32, device="cpu", capacity=4)
    cache.begin_block(max(lengths))
    marks = torch.tensor([[1000.0 * r + s for s in range(max(lengths))] for r in range(len(lengths))])
    states = marks[:, None, :, None].expand(-1, 2, -1, 3)
    cache.update(states, states, 0)
    cache.commit(lengths)
    return cache


def test_a_block_lands_at_each_rows_own_end_and_sees_only_that_row():
    cache = filled_cache([2, 5])
    positions, mask = cache.begin_block(3)
    assert positions.tolist() == [[2, 3, 4], [5, 6, 7]]
    visible = (mask[:, 0] == 0).int().tolist()
    assert visible[0] == [[1, 1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0, 0, 0]]
    assert visible[1][0] == [1, 1, 1, 1, 1, 1, 0, 0]
    new = torch.full((2, 2, 3, 3), -1.0)
    keys, _ = cache.update(new, new, 0)
    assert keys.shape[2] == 8 and cache.capacity >= 8  # grown past the initial 4 slots
    assert keys[0, 0, :, 0].tolist() == [0, 1, -1, -1, -1, 0, 0, 0]  # free slots stay finite
    assert keys[1, 0, :, 0].tolist() == [1000, 1001, 1002, 1003, 1004, -1, -1, -1]


def test_committing_fewer_tokens_frees_the_rest_for_the_next_block():
    cache = filled_cache([2, 2])
    cache.begin_block(3)
    cache.update(torch.full((2, 2, 3, 3), 7.0), torch.full((2, 2, 3, 3), 7.0), 0)
    cache.commit([3, 5])  # row 0 kept one of its three (a rejected draft), row 1 all
    positions, _ = cache.begin_block(1)
    assert positions.tolist() == [[3], [5]]
    assert cache.get_seq_length() == 5


def test_pack_moves_only_the_rows_past_the_new_end():
    cache = filled_cache([2, 3, 4, 5])
    order = cache.pack([1, 3])
    assert order == [3, 1] and cache.batch == 2
    assert cache.lengths.tolist() == [5, 3]
    assert cache.keys[0][0, 0, :5, 0].tolist() == [3000, 3001, 3002, 3003, 3004]
    assert cache.keys[0][1, 0, :3, 0].tolist() == [1000, 1001, 1002]


def test_set_row_copies_a_prefix_into_a_row():
    prefix = filled_cache([3])
    cache = filled_cache([1, 1])
    cache.set_row(1, prefix)
    assert cache.lengths.tolist() == [1, 3]
    assert cache.values[0][1, 1, :3, 2].tolist() == [0, 1, 2]


def test_prompt_lookup_drafts_what_followed_the_latest_match():
    context = PromptLookup(max_ngram=3)
    context.extend([5, 6, 7, 8, 9, 5, 6, 7, 1, 2, 5, 6])
    assert context.draft(7, limit=3) == [1, 2, 5]  # "5 6 7" last seen before "1 2"
    assert context.draft(9, limit=4) == [5, 6, 7, 1]  # only the 1-gram "9" matches
    assert context.draft(4, limit=4) == []
    assert context.draft(7, limit=0) == []
    fresh = PromptLookup()
    fresh.extend([3])
    assert fresh.draft(3, limit=2) == []  # the context's own last token is no earlier match
