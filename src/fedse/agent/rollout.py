"""The batched rollout engine: many episodes, one model, every turn's work shared.

How a rollout proceeds:

1. Episodes are admitted into a batch of at most `max_batch` rows. An admitted episode's
   row starts from its environment's shared prefix (system prompt, instruction and the
   acknowledgement), encoded once per (environment, adapter) and copied, not recomputed.
   Newly admitted episodes of one environment and adapter are prefilled together.
2. Each decode step advances every generating row by one token. A row whose turn has
   ended (its observation queued) waits, and the waiting rows are prefilled together, in
   one block on a copy of just their cache rows, once enough of them wait (or a row has
   waited a few steps, or nobody is generating). So observations are encoded in blocks,
   not token by token, and nobody waits for the slowest row of a turn.
3. A turn ends at a stop token or `max_new_tokens`; the text goes to `env.step`, and the
   reply (only the new observation, in the chat template's format) is queued for the row.
   Episodes end when the environment says done, at `max_turns`, or when the next turn would
   not fit `max_context`.

Every row keeps its KV cache for the whole episode (`SlotCache`), so no token is encoded
twice. Rows may use different adapters in one forward pass; when every request uses the same
adapter (exploration, evaluation) it is merged into the weights for the rollout instead. Sampling uses one seeded
generator per episode, so an episode's draws do not depend on its batch neighbours.

`naive_rollout` is the reference loop (AgentGym's): one episode at a time, the whole history
re-encoded every turn with `generate`. It feeds exactly the same token ids.
"""

from __future__ import annotations

import ctypes
import functools
import sys
import time
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from fedse.agent.chat import ChatLayout, Message, episode_messages
from fedse.agent.kvcache import ATTENTION_NAME, SlotCache
from fedse.agent.policy import Policy
from fedse.agent.trajectory import Trajectory
from fedse.envs import TextEnv, make_env


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    max_new_tokens: int = 96


GREEDY = Sampling(temperature=0.0)
MAX_WAIT = 4  # decode steps a row with a queued observation may wait to be prefilled with others
PREFILL_SCORES = 2**27  # attention scores one prefill forward may hold (512 MB in fp32)


@dataclass
class RolloutRequest:
    env: str | Callable[[], TextEnv]
    task_id: int
    adapter: str | None = None
    sampling: Sampling = GREEDY
    seed: int = 0
    max_turns: int | None = None
    """Defaults to the environment's own limit."""

    def make_env(self) -> TextEnv:
        return make_env(self.env) if isinstance(self.env, str) else self.env()


@dataclass
class RolloutStats:
    episodes: int = 0
    turns: int = 0
    generated_tokens: int = 0
    processed_tokens: int = 0
    """Tokens run through the model (prompt and generated; padding not counted)."""
    seconds: float = 0.0

    def summary(self) -> str:
        s = max(self.seconds, 1e-9)
        return (
            f"{self.episodes} episodes, {self.turns} turns in {self.seconds:.1f} s: {self.episodes / s:.3f} episodes/s, "
            f"{self.generated_tokens / s:.1f} generated tok/s, {self.processed_tokens / s:.1f} processed tok/s"
        )


# --- sampling ----------------------------------------------------------------------------


def sample_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> tuple[int, float]:
    """One token from a row of logits, and its log-probability under the model (temperature 1)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    if sampling.temperature <= 0:
        token = int(torch.argmax(logprobs))
    else:
        probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
        if sampling.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = sorted_probs.cumsum(0) - sorted_probs < sampling.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        token = int(torch.multinomial(probs, 1, generator=generator))
    return token, float(logprobs[token])


# --- one episode's state ------------------------------------------------------------------


@dataclass
class _Episode:
    index: int
    request: RolloutRequest
    env: TextEnv
    messages: list[Message]
    consumed: str
    queue: list[int]
    generator: torch.Generator
    max_turns: int
    status: str = "prompt"  # prompt (observation queued) -> gen -> prompt ... -> finished
    waited: int = 0  # decode steps spent waiting for a prefill
    next_token: int | None = None
    gen_ids: list[int] = field(default_factory=list)
    gen_logprobs: list[float] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)
    length: int = 0  # tokens in this episode's cache row
    prompt_tokens: int = 0
    generated_tokens: int = 0
    turns: int = 0
    reward: float = 0.0
    success: bool = False
    finish: str = ""


@functools.cache
def _return_large_buffers_to_the_os() -> None:
    """Have glibc serve allocations of 4 MB and more with mmap, so that freeing returns them.

    A rollout allocates attention buffers that grow by one key per decode step. With glibc's
    adaptive threshold those come from the heap, each a little larger than the freed one
    before it, and the heap fragments: a 30-episode evaluation at 4k tokens reached 12 GB of
    resident memory (24 GB, killed, in a later round) against 4.9 GB with a fixed threshold.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl): nothing to tune
        return
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 4 << 20)


class RolloutEngine:
    def __init__(self, policy: Policy, max_batch: int = 32, max_context: int = 4096, progress: str | None = None):
        _return_large_buffers_to_the_os()
        self.policy = policy
        self.layout = ChatLayout(policy.tokenizer)
        self.stop_ids = self.layout.stop_ids
        self.max_batch = max_batch
        self.max_context = min(max_context, getattr(policy.base.model.config, "max_position_embeddings", max_context))
        self.query_heads = policy.base.model.config.num_attention_heads
        self.progress = progress
        self.pad_id = policy.tokenizer.pad_token_id or 0
        self._prefixes: dict[tuple[str, str | None], tuple[SlotCache, int]] = {}
        self._finished: list[_Episode] = []

    # --- public --------------------------------------------------------------------------

    @torch.no_grad()
    def run(self, requests: list[RolloutRequest], stats: RolloutStats | None = None) -> list[Trajectory]:
        stats = stats if stats is not None else RolloutStats()
        start = time.perf_counter()
        self._prefixes.clear()
        pending = deque(self._start(i, r) for i, r in enumerate(requests))
        done: list[_Episode] = []
        rows: list[_Episode] = []
        cache: SlotCache | None = None
        bar = _progress_bar(len(requests), self.progress) if self.progress else None
        adapters = {r.adapter for r in requests}
        # One adapter (by content) for the whole rollout, e.g. every client exploring from the
        # same global adapter: fold it into the weights.
        single = None not in adapters and len({self.policy.hash_of(a) for a in adapters}) == 1
        merged = self.policy.merged(next(iter(adapters))) if single else nullcontext()
        with self.policy.attention(ATTENTION_NAME), merged:
            while pending or rows:
                active = [e for e in rows if e.status != "finished"]
                free = [i for i, e in enumerate(rows) if e.status == "finished"]
                if pending and not rows:
                    admitted = [pending.popleft() for _ in range(min(self.max_batch, len(pending)))]
                    cache, rows = self._admit(cache, rows, admitted, stats)
                elif pending and free:
                    for i in free[: len(pending)]:
                        rows[i] = self._admit_in_place(cache, i, pending.popleft(), stats)
                elif not active or self._too_sparse(cache, rows, active):
                    cache, rows = self._compact(cache, rows, [])
                else:
                    waiting = [i for i, e in enumerate(rows) if e.status == "prompt"]
                    generating = len(active) - len(waiting)
                    if waiting and (
                        not generating
                        or len(waiting) >= max(1, len(active) // 8)
                        or max(rows[i].waited for i in waiting) >= MAX_WAIT
                    ):
                        for group in _similar_lengths(waiting, rows):
                            self._prefill_rows(cache, rows, group, stats)
                    else:
                        self._decode_step(cache, rows, stats)
                finished, self._finished = self._finished, []
                done += finished
                if bar is not None and finished:
                    bar.update(len(finished))
                    elapsed = time.perf_counter() - start
                    bar.set_postfix(turns=stats.turns, tok_s=f"{stats.processed_tokens / elapsed:.0f}")
        if bar is not None:
            bar.close()
        stats.episodes += len(done)
        stats.seconds += time.perf_counter() - start
        return [self._trajectory(e) for e in sorted(done, key=lambda e: e.index)]

    @staticmethod
    def _too_sparse(cache: SlotCache, rows: list[_Episode], active: list[_Episode]) -> bool:
        """Compact when finished rows or empty slots make a large share of the cache."""
        if len(active) <= 0.75 * len(rows):
            return True
        return cache.length > 1.3 * int(cache.real_lengths().max()) + 32

    # --- episode lifecycle ---------------------------------------------------------------

    def _start(self, index: int, request: RolloutRequest) -> _Episode:
        env = request.make_env()
        observation = env.reset(request.task_id)
        messages = episode_messages(env.instruction, [observation], [])
        consumed = self.layout.prefix_text(env.instruction)
        text = self.layout.continuation(messages, consumed)
        generator = torch.Generator().manual_seed(request.seed)
        return _Episode(
            index,
            request,
            env,
            messages,
            consumed + text,
            self.layout.encode(text),
            generator,
            request.max_turns or env.max_turns,
        )

    def _prefix(self, episode: _Episode, stats: RolloutStats) -> tuple[SlotCache, int]:
        """The shared prefix cache of an (environment, adapter) pair, computed once per run."""
        key = (episode.env.instruction, episode.request.adapter)
        if key not in self._prefixes:
            ids = self.layout.encode(self.layout.prefix_text(episode.env.instruction))
            cache = self._new_cache(1, len(ids))
            self._forward(
                cache,
                [episode.request.adapter],
                torch.tensor([ids]),
                torch.ones(1, len(ids), dtype=torch.bool),
                last_only=True,  # only the cache is kept
            )
            stats.processed_tokens += len(ids)
            self._prefixes[key] = (cache, len(ids))
        return self._prefixes[key]

    def _admit(self, cache, rows, new: list[_Episode], stats: RolloutStats):
        groups: dict[tuple[str, str | None], list[_Episode]] = {}
        for e in new:
            groups.setdefault((e.env.instruction, e.request.adapter), []).append(e)
        sources: list[tuple[SlotCache, int]] = []
        admitted: list[_Episode] = []
        for group in groups.values():
            prefix, length = self._prefix(group[0], stats)
            group_cache = prefix.compact([(prefix, 0)] * len(group))
            for e in group:
                e.length = length
            self._prefill(group_cache, group, stats)
            sources += [(group_cache, j) for j in range(len(group))]
            admitted += group
        return self._compact(cache, rows, admitted, sources)

    def _admit_in_place(self, cache: SlotCache, row: int, e: _Episode, stats: RolloutStats) -> _Episode:
        """Put a new episode in a finished row: copy its shared prefix in; its observation waits."""
        prefix, e.length = self._prefix(e, stats)
        cache.replace_row(row, prefix)
        return e

    def _compact(self, cache, rows, admitted, extra_sources=()):
        keep = [i for i, e in enumerate(rows) if e.status != "finished"]
        sources = [(cache, i) for i in keep] + list(extra_sources)
        template = cache if cache is not None else (extra_sources[0][0] if extra_sources else None)
        if template is None or not sources:
            return None, []
        return template.compact(sources), [rows[i] for i in keep] + admitted

    def _prefill(self, cache: SlotCache, group: list[_Episode], stats: RolloutStats) -> None:
        """Feed each episode's whole queue in one block (left-padded), then sample its next token."""
        width = max(len(e.queue) for e in group)
        ids = torch.full((len(group), width), self.pad_id, dtype=torch.long)
        real = torch.zeros(len(group), width, dtype=torch.bool)
        for j, e in enumerate(group):
            n = len(e.queue)
            ids[j, width - n :] = torch.tensor(e.queue)
            real[j, width - n :] = True
            e.length += n
            e.prompt_tokens += n
            stats.processed_tokens += n
            e.queue, e.waited, e.status = [], 0, "gen"
        # In column chunks: attention materialises (rows x query heads x chunk x keys) scores,
        # which for 30 rows x a 700-token results page x 4k keys would take gigabytes at once.
        # Left padding puts every row's last token in the last column, so the last chunk's
        # logits are the ones to sample from.
        chunk = max(16, PREFILL_SCORES // (len(group) * self.query_heads * (cache.length + width)))
        adapters = [e.request.adapter for e in group]
        for start in range(0, width, chunk):
            logits = self._forward(cache, adapters, ids[:, start : start + chunk], real[:, start : start + chunk], True)
        for j, e in enumerate(group):
            if self._take(e, logits[j, -1]):
                self._end_turn(e, stats)

    def _prefill_rows(self, cache: SlotCache, rows: list[_Episode], waiting: list[int], stats: RolloutStats) -> None:
        """Prefill the waiting rows' observations on a copy of their cache rows, then write back."""
        group = [rows[i] for i in waiting]
        part = cache.select(waiting, spare=max(len(e.queue) for e in group))
        self._prefill(part, group, stats)
        cache.write_back(part, waiting)

    def _decode_step(self, cache: SlotCache, rows: list[_Episode], stats: RolloutStats) -> None:
        """One token for every generating row; waiting and finished rows idle."""
        ids = torch.full((len(rows), 1), self.pad_id, dtype=torch.long)
        real = torch.zeros(len(rows), 1, dtype=torch.bool)
        for i, e in enumerate(rows):
            if e.status == "gen":
                ids[i, 0] = e.next_token
                real[i, 0] = True
                e.length += 1
                stats.processed_tokens += 1
            elif e.status == "prompt":
                e.waited += 1
        logits = self._forward(cache, [e.request.adapter for e in rows], ids, real)
        for i, e in enumerate(rows):
            if real[i, 0] and self._take(e, logits[i, -1]):
                self._end_turn(e, stats)

    def _take(self, e: _Episode, logits: torch.Tensor) -> bool:
        """Sample the next token of `e`'s turn; True when the turn has ended."""
        token, logprob = sample_token(logits, e.request.sampling, e.generator)
        e.gen_logprobs.append(logprob)
        e.generated_tokens += 1
        if token in self.stop_ids:
            e.next_token = None
            return True
        e.gen_ids.append(token)
        e.next_token = token
        return len(e.gen_ids) >= e.request.sampling.max_new_tokens

    def _end_turn(self, e: _Episode, stats: RolloutStats) -> None:
        text = self.policy.tokenizer.decode(e.gen_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        unfed = [e.next_token] if e.next_token is not None else []  # the turn hit max_new_tokens
        result = e.env.step(text)
        stats.turns += 1
        stats.generated_tokens += len(e.gen_logprobs)
        e.turns += 1
        e.logprobs.append(e.gen_logprobs)
        e.messages += [{"role": "assistant", "content": text}, {"role": "user", "content": result.observation}]
        e.reward, e.success = result.reward, result.success
        e.gen_ids, e.gen_logprobs, e.next_token = [], [], None
        if result.done:
            e.finish = "done"
        elif e.turns >= e.max_turns:
            e.finish = "max_turns"
        else:
            suffix = self.layout.continuation(e.messages, e.consumed + text)
            queue = unfed + self.layout.encode(suffix)
            if e.length + len(queue) + e.request.sampling.max_new_tokens <= self.max_context:
                e.consumed += text + suffix
                e.queue, e.status = queue, "prompt"
                return
            e.finish = "context"
        e.status = "finished"
        self._finished.append(e)

    def _trajectory(self, e: _Episode) -> Trajectory:
        return Trajectory(
            env=e.env.name,
            task_id=e.request.task_id,
            messages=e.messages,
            reward=e.reward,
            success=e.success,
            turns=e.turns,
            adapter=self.policy.hash_of(e.request.adapter),
            finish=e.finish,
            seed=e.request.seed,
            prompt_tokens=e.prompt_tokens,
            generated_tokens=e.generated_tokens,
            logprobs=e.logprobs,
        )

    # --- model calls ---------------------------------------------------------------------

    def _new_cache(self, batch: int, capacity: int) -> SlotCache:
        model = self.policy.base.model
        return SlotCache.for_model(model.config, batch, model.dtype, self.policy.device, capacity=capacity)

    def _forward(self, cache: SlotCache, adapters, ids, real, last_only: bool = False) -> torch.Tensor:
        device = self.policy.device
        pos, mask = cache.begin_block(real.to(device))
        return self.policy.forward(
            adapters,
            input_ids=ids.to(device),
            attention_mask=mask,
            position_ids=pos,
            cache=cache,
            use_cache=True,
            logits_to_keep=1 if last_only else 0,
        )


def _similar_lengths(waiting: list[int], rows: list[_Episode]) -> list[list[int]]:
    """Split waiting rows into prefill groups whose queue lengths differ by at most 2x."""
    groups: list[list[int]] = []
    for i in sorted(waiting, key=lambda i: len(rows[i].queue)):
        if groups and len(rows[i].queue) <= 2 * len(rows[groups[-1][0]].queue):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def rollout(
    policy: Policy,
    requests: list[RolloutRequest],
    *,
    max_batch: int = 32,
    max_context: int = 4096,
    progress: str | None = None,
    stats: RolloutStats | None = None,
) -> list[Trajectory]:
    """Play every request to the end; trajectories come back in request order.

    `progress` labels a progress bar (episodes, turns, tokens/s); None shows none.
    """
    return RolloutEngine(policy, max_batch, max_context, progress).run(requests, stats)


def _progress_bar(total: int, label: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=label, unit="ep", dynamic_ncols=True, leave=False)


# --- the reference loop ----------------------------------------------------------------------


@torch.no_grad()
def naive_rollout(
    policy: Policy, requests: list[RolloutRequest], stats: RolloutStats | None = None
) -> list[Trajectory]:
    """AgentGym's loop: one episode at a time, the whole history re-encoded every turn (`generate`)."""
    stats = stats if stats is not None else RolloutStats()
    layout = ChatLayout(policy.tokenizer)
    stop_ids = sorted(layout.stop_ids)
    start = time.perf_counter()
    out = []
    for request in requests:
        env = request.make_env()
        observation = env.reset(request.task_id)
        messages = episode_messages(env.instruction, [observation], [])
        consumed = layout.prefix_text(env.instruction)
        ids = layout.encode(consumed)
        text = layout.continuation(messages, consumed)
        ids += layout.encode(text)
        consumed += text
        logprobs, reward, success, finish, turns, prompt_tokens, generated = [], 0.0, False, "max_turns", 0, 0, 0
        generator = torch.Generator().manual_seed(request.seed)
        for _ in range(request.max_turns or env.max_turns):
            prompt_tokens += len(ids)
            gen_ids, turn_logprobs = _generate(policy, request, ids, stop_ids, generator)
            generated += len(turn_logprobs)
            stats.processed_tokens += len(ids) + len(gen_ids)
            text = policy.tokenizer.decode(gen_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            result = env.step(text)
            turns += 1
            logprobs.append(turn_logprobs)
            messages += [{"role": "assistant", "content": text}, {"role": "user", "content": result.observation}]
            reward, success = result.reward, result.success
            if result.done:
                finish = "done"
                break
            suffix = layout.continuation(messages, consumed + text)
            ids = ids + gen_ids + layout.encode(suffix)
            consumed += text + suffix
        stats.turns += turns
        stats.generated_tokens += generated
        out.append(
            Trajectory(
                env=env.name,
                task_id=request.task_id,
                messages=messages,
                reward=reward,
                success=success,
                turns=turns,
                adapter=policy.hash_of(request.adapter),
                finish=finish,
                seed=request.seed,
                prompt_tokens=prompt_tokens,
                generated_tokens=generated,
                logprobs=logprobs,
            )
        )
    stats.episodes += len(out)
    stats.seconds += time.perf_counter() - start
    return out


def _generate(policy: Policy, request: RolloutRequest, ids: list[int], stop_ids: list[int], generator):
    """One turn with the model's own cache inside the turn; returns the ids (stop excluded) and log-probs."""
    model = policy.model
    if policy.peft is not None and request.adapter is not None:
        policy.activate(request.adapter)
    input_ids = torch.tensor([ids], device=policy.device)
    sampling = request.sampling
    gen_ids, logprobs = [], []
    cache = None
    context = policy.peft.disable_adapter() if (policy.peft is not None and request.adapter is None) else nullcontext()
    with context:
        for _ in range(sampling.max_new_tokens):
            out = model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
            cache = out.cache
            token, logprob = sample_token(out.logits[0, -1], sampling, generator)
            logprobs.append(logprob)
            if token in stop_ids:
                break
            gen_ids.append(token)
            input_ids = torch.tensor([[token]], device=policy.device)
    return gen_ids, logprobs
