"""The batched rollout engine: many episodes, one model, every turn's work shared.

Scheduling lives here; running the model for one pass lives in `fedse.agent.rollout.block`.
Every live episode is a row of the batch with its own KV cache for the whole episode
(`RowCache`), so no kept token is encoded twice. A new episode's row starts from its
environment's shared prefix (system prompt, instruction, acknowledgement), encoded once per
(environment, adapter) and copied in. Finished rows take the next pending episode; once
nothing is pending the batch shrinks in place (`RowCache.pack`).

Rows may use different adapters in one forward pass; when every request uses the same
adapter (exploration, evaluation) it is merged into the weights for the rollout instead.
Sampling uses one seeded generator per episode, drawn once per produced token, so an
episode's draws depend neither on its batch neighbours nor on the drafts.
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import nullcontext

import torch

from fedse.agent.chat import ChatLayout
from fedse.agent.kvcache import ATTENTION_NAME, RowCache
from fedse.agent.policy import Policy
from fedse.agent.rollout.block import MAX_DRAFT, BlockRunner, Rows, forward_block
from fedse.agent.rollout.episode import Episode, start_episode
from fedse.agent.rollout.types import RolloutRequest, RolloutStats
from fedse.agent.trajectory import Trajectory
from fedse.progress import progress_bar


class RolloutEngine:
    def __init__(
        self,
        policy: Policy,
        max_batch: int = 32,
        max_context: int = 4096,
        progress: str | None = None,
        max_draft: int = MAX_DRAFT,
    ):
        self.policy = policy
        self.layout = ChatLayout(policy.tokenizer)
        self.max_batch = max_batch
        self.max_context = min(max_context, policy.max_positions or max_context)
        self.progress = progress
        self.max_draft = max_draft
        self._prefixes: dict[tuple[str, str | None], tuple[RowCache, list[int]]] = {}

    @torch.no_grad()
    def run(self, requests: list[RolloutRequest], stats: RolloutStats | None = None) -> list[Trajectory]:
        """Play every request to the end; trajectories come back in request order."""
        stats = stats if stats is not None else RolloutStats()
        start = time.perf_counter()
        self._prefixes.clear()
        runner = BlockRunner(self.policy, self.layout, self.max_context, self.max_draft)
        pending = deque(start_episode(i, r, self.layout) for i, r in enumerate(requests))
        done: list[Episode] = []
        rows: Rows = []
        cache: RowCache | None = None
        bar = progress_bar(len(requests), self.progress, unit="ep")
        with self.policy.attention(ATTENTION_NAME), self._merged_if_single(requests):
            while pending or any(rows):
                if cache is None:
                    rows = [None] * min(self.max_batch, len(pending))
                    cache = self.policy.new_cache(len(rows), 256)
                rows = self._fill(cache, rows, pending, stats)
                finished = runner.run(cache, rows, stats)
                rows = [None if e in finished else e for e in rows]
                done += finished
                if finished:
                    bar.update(len(finished))
                    elapsed = time.perf_counter() - start
                    bar.set_postfix(turns=stats.turns, tok_s=f"{stats.processed_tokens / elapsed:.0f}")
        bar.close()
        stats.episodes += len(done)
        stats.seconds += time.perf_counter() - start
        return [e.trajectory(self.policy.hash_of(e.request.adapter)) for e in sorted(done, key=lambda e: e.index)]

    def _merged_if_single(self, requests: list[RolloutRequest]):
        """One adapter (by content) for the whole rollout, e.g. every client exploring from the
        same global adapter: fold it into the weights."""
        adapters = {r.adapter for r in requests}
        single = None not in adapters and len({self.policy.hash_of(a) for a in adapters}) == 1
        return self.policy.merged(next(iter(adapters))) if single else nullcontext()

    def _fill(self, cache: RowCache, rows: Rows, pending: deque[Episode], stats: RolloutStats) -> Rows:
        """Give free rows the next pending episodes; once too many rows stay free, shrink the batch."""
        rows = list(rows)
        for i, e in enumerate(rows):
            if e is None and pending:
                rows[i] = self._admit(cache, i, pending.popleft(), stats)
        idle = sum(e is None for e in rows)
        if idle >= max(1, len(rows) // 8):  # nothing pending: shrink the batch
            order = cache.pack([i for i, e in enumerate(rows) if e is not None])
            rows = [rows[i] for i in order]
        return rows

    def _admit(self, cache: RowCache, row: int, e: Episode, stats: RolloutStats) -> Episode:
        """Start episode `e` in `row`: its environment's shared prefix is copied in, its first
        observation is already queued."""
        key = (e.env.instruction, e.request.adapter)
        if key not in self._prefixes:
            ids = self.layout.encode(self.layout.prefix_text(e.env.instruction))
            prefix = self.policy.new_cache(1, len(ids))
            forward_block(self.policy, prefix, [e.request.adapter], torch.tensor([ids], device=self.policy.device), [])
            prefix.commit([len(ids)])
            stats.processed_tokens += len(ids)
            self._prefixes[key] = (prefix, ids)
        prefix, ids = self._prefixes[key]
        cache.set_row(row, prefix)
        e.context.extend(ids)
        return e


def rollout(
    policy: Policy,
    requests: list[RolloutRequest],
    *,
    max_batch: int = 32,
    max_context: int = 4096,
    progress: str | None = None,
    stats: RolloutStats | None = None,
    max_draft: int = MAX_DRAFT,
) -> list[Trajectory]:
    """Play every request to the end; trajectories come back in request order.

    `progress` labels a progress bar (episodes, turns, tokens/s); None shows none.
    `max_draft=0` turns speculative decoding off.
    """
    return RolloutEngine(policy, max_batch, max_context, progress, max_draft).run(requests, stats)
