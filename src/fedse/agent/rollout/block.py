"""Running the model for the engine: one forward pass over every live row, one block per row.

- a row whose turn is under way feeds the token it sampled last, followed by draft tokens
  looked up in its own context (`PromptLookup`); the model's own choice at each position
  is taken, and drafts are kept up to the first one the model disagrees with. Speculative
  decoding with a deterministic draft: the tokens produced are those of plain decoding
  (greedy or sampled with the same per-episode generator draws), only more come per pass;
- a row whose turn has ended feeds the next chunk of its queued observation (prefill), so
  observations are encoded alongside other rows' generation and nobody waits for a turn.

The block width is chosen each pass by a small cost model (`BlockRunner.width`): wide enough
that a pass is not spent re-reading weights and the KV cache for one token per row, narrow
enough that padding and unlikely drafts do not eat the compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedse.agent.chat import ChatLayout
from fedse.agent.kvcache import RowCache
from fedse.agent.policy import Policy
from fedse.agent.rollout.episode import Episode, Status
from fedse.agent.rollout.types import RolloutStats, sample_token

MAX_DRAFT = 15  # draft tokens a row may feed after its sampled token
# The block-width cost model, from SmolLM2-135M in fp32 on a 2-core CPU: a one-row pass costs
# ~35 ms (reading the weights) against ~1.2 ms per token in a wide pass, and reading one cached
# key of all layers ~3 us. On a GPU wider blocks would pay; these are not tuned there.
PASS_OVERHEAD = 32  # a pass's fixed cost, in tokens' worth of compute
KEYS_PER_TOKEN = 512  # cached keys whose reading costs about as much as computing one token
SCORES_PER_PASS = 2**27  # attention scores one pass may hold (512 MB in fp32)
PICK_ROWS = 16  # logits rows put through log-softmax at a time (fp32: 3 MB for SmolLM2's 49,152)

Rows = list[Episode | None]


@dataclass
class _Picked:
    """The logits of the wanted positions of one pass, and each position's greedy choice."""

    logits: torch.Tensor
    where: dict[tuple[int, int], int]
    best: list[int]
    best_logprob: list[float]

    @classmethod
    def of(cls, logits: torch.Tensor, wanted: list[tuple[int, int]]) -> _Picked:
        """`logits` in the model's dtype; each block of rows goes through log-softmax in fp32.

        Why blocks: a pass's logits in fp32 and their log-softmax are each rows x vocabulary
        (6 MB at 32 rows). glibc serves that size by mmap (`fedse.process`), so every pass
        page-faulted both in anew (a 30-episode evaluation on an AMX Xeon: 6.6M page faults,
        4.9M in blocks). Row by row the result is the same."""
        best: list[int] = []
        best_logprob: list[float] = []
        for block in logits.split(PICK_ROWS):
            logprobs = torch.log_softmax(block.float(), dim=-1)
            top = logprobs.argmax(-1)
            best += top.tolist()
            best_logprob += logprobs.gather(1, top[:, None])[:, 0].tolist()  # one transfer per block
        return cls(logits, {pos: k for k, pos in enumerate(wanted)}, best, best_logprob)

    def choose(self, e: Episode, i: int, j: int) -> tuple[int, float]:
        """The token at (row i, position j), greedy or drawn from `e`'s generator, and its log-prob."""
        k = self.where[(i, j)]
        if e.request.sampling.temperature <= 0:
            return self.best[k], self.best_logprob[k]
        return sample_token(self.logits[k], e.request.sampling, e.generator)


class BlockRunner:
    """Runs passes for one rollout; keeps that rollout's draft acceptance for the cost model."""

    def __init__(self, policy: Policy, layout: ChatLayout, max_context: int, max_draft: int = MAX_DRAFT) -> None:
        self.policy = policy
        self.layout = layout
        self.stop_ids = layout.stop_ids
        self.max_context = max_context
        self.max_draft = max_draft
        self.pad_id = policy.tokenizer.pad_token_id or 0
        self.drafted = self.accepted = 0

    def run(self, cache: RowCache, rows: Rows, stats: RolloutStats) -> list[Episode]:
        """One forward pass: each generating row feeds its sampled token and drafts, each
        prompting row the next chunk of its observation; then every row takes its results.
        Returns the episodes that finished in this pass."""
        span = int(cache.lengths.max())
        max_width = max(1, SCORES_PER_PASS // (len(rows) * self.policy.query_heads * (span + 64)))
        feeds, firm = self.feeds(rows, max_width)
        width = self.width([len(f) for f in feeds.values()], list(firm.values()), len(rows), span)
        feeds = {i: f[:width] for i, f in feeds.items()}
        wanted = self._wanted(rows, feeds)
        picked = _Picked.of(self.forward(cache, rows, feeds, width, wanted), wanted)
        stats.forward_passes += 1
        finished = []
        for i, f in feeds.items():
            e = rows[i]
            advance = self._prompted if e.status is Status.PROMPT else self._generated
            if advance(e, f, i, picked, stats):
                e.end_turn(self.layout, self.max_context, stats)
                if e.status is Status.FINISHED:
                    finished.append(e)
        cache.commit([e.length if e is not None and e.status is not Status.FINISHED else 0 for e in rows])
        return finished

    def feeds(self, rows: Rows, max_width: int) -> tuple[dict[int, list[int]], dict[int, int]]:
        """What each live row would feed at most: its observation's next chunk, or its sampled
        token and drafts; and how many of those tokens are surely kept (the rest are drafts)."""
        feeds: dict[int, list[int]] = {}
        firm: dict[int, int] = {}
        for i, e in enumerate(rows):
            if e is None:
                continue
            if e.status is Status.PROMPT:
                feeds[i] = e.queue[:max_width]
                firm[i] = len(feeds[i])
            else:
                room = e.request.sampling.max_new_tokens - len(e.gen_ids) - 1  # tokens a draft could add
                feeds[i] = [e.next_token, *e.context.draft(e.next_token, min(self.max_draft, room, max_width - 1))]
                firm[i] = 1
        return feeds, firm

    def width(self, wants: list[int], firm: list[int], rows: int, span: int) -> int:
        """The block width with the most expected useful tokens per unit of cost.

        A pass costs rows x width tokens of compute plus a fixed part (weights, and the KV
        cache every row reads); a row's token counts as useful if it is firm (prompt, or the
        sampled token), a draft counts at the acceptance rate seen so far in this rollout.
        """
        accept = (self.accepted + 1) / (self.drafted + 2)
        fixed = PASS_OVERHEAD + rows * span / KEYS_PER_TOKEN

        def value(width: int) -> float:
            useful = sum(min(f, width) + accept * max(0, min(w, width) - f) for w, f in zip(wants, firm, strict=True))
            return useful / (rows * width + fixed)

        return max(sorted(set(wants)), key=value)

    @staticmethod
    def _wanted(rows: Rows, feeds: dict[int, list[int]]) -> list[tuple[int, int]]:
        """The positions that produce a token, in row-major order (feeds are keyed by ascending
        row): every fed position of a generating row, the last one of a prompt now complete."""
        wanted = []
        for i, f in feeds.items():
            e = rows[i]
            if e.status is Status.GENERATING:
                wanted += [(i, j) for j in range(len(f))]
            elif len(f) == len(e.queue):
                wanted.append((i, len(f) - 1))
        return wanted

    def forward(
        self, cache: RowCache, rows: Rows, feeds: dict[int, list[int]], width: int, wanted: list[tuple[int, int]]
    ) -> torch.Tensor:
        """Run one block; the logits (N, V) of the `wanted` (row, column) positions only."""
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for i, f in feeds.items():
            ids[i, : len(f)] = torch.tensor(f)
        live = next(e.request.adapter for e in rows if e is not None)
        adapters = [e.request.adapter if e is not None else live for e in rows]  # empty rows: any live one's
        return forward_block(self.policy, cache, adapters, ids.to(self.policy.device), wanted)

    def _prompted(self, e: Episode, fed: list[int], i: int, picked: _Picked, stats: RolloutStats) -> bool:
        """A prompt chunk was fed; once the prompt is complete the model's first token is taken.
        True when that token already ended the turn."""
        e.context.extend(fed)
        e.queue = e.queue[len(fed) :]
        e.prompt_tokens += len(fed)
        stats.processed_tokens += len(fed)
        if e.queue:
            return False
        e.status = Status.GENERATING
        return e.take(*picked.choose(e, i, len(fed) - 1), self.stop_ids)

    def _generated(self, e: Episode, fed: list[int], i: int, picked: _Picked, stats: RolloutStats) -> bool:
        """The sampled token and drafts were fed: take the model's tokens up to the first
        draft it disagrees with. True when the turn ended."""
        stats.drafted_tokens += len(fed) - 1
        self.drafted += len(fed) - 1
        for j, token in enumerate(fed):
            e.context.extend([token])
            stats.processed_tokens += 1
            if e.take(*picked.choose(e, i, j), self.stop_ids):
                return True
            if j + 1 == len(fed) or fed[j + 1] != e.next_token:
                return False
            stats.accepted_tokens += 1
            self.accepted += 1
        return False


def forward_block(
    policy: Policy, cache: RowCache, adapters: list[str | None], ids: torch.Tensor, wanted: list[tuple[int, int]]
) -> torch.Tensor:
    """Feed `ids` (B, S) at each row's end of `cache`; the logits (N, V) of the `wanted`
    (row, column) positions only, in the order given (row-major)."""
    pos, mask = cache.begin_block(ids.shape[1])
    keep = torch.zeros(ids.shape, dtype=torch.bool)
    if wanted:
        keep[torch.tensor(wanted, dtype=torch.long).unbind(1)] = True
    return policy.logits(
        adapters, ids, keep=keep.to(ids.device), attention_mask=mask, position_ids=pos, cache=cache, use_cache=True
    )
