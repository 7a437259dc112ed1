"""The batched rollout engine: many episodes, one model, every turn's work shared.

Every forward pass carries a block of tokens for each live episode (a row of the batch):

- a row whose turn is under way feeds the token it sampled last, followed by draft tokens
  looked up in its own context (`PromptLookup`); the model's own choice at each position
  is taken, and drafts are kept up to the first one the model disagrees with. Speculative
  decoding with a deterministic draft: the tokens produced are those of plain decoding
  (greedy or sampled with the same per-episode generator draws), only more come per pass;
- a row whose turn has ended feeds the next chunk of its queued observation (prefill), so
  observations are encoded alongside other rows' generation and nobody waits for a turn.

The block width is chosen each pass by a small cost model (`_block_width`): wide enough that
a pass is not spent re-reading weights and the KV cache for one token per row, narrow enough
that padding and unlikely drafts do not eat the compute.

Each row keeps its KV cache for the whole episode (`RowCache`), so no kept token is encoded
twice. A new episode's row starts from its environment's shared prefix (system prompt,
instruction, acknowledgement), encoded once per (environment, adapter) and copied. A turn
ends at a stop token or `max_new_tokens`; the text goes to `env.step`, and the reply (only
the new observation, in the chat template's format) is queued for the row. Episodes end when
the environment says done, at `max_turns`, or when the next turn would not fit `max_context`.
Finished rows take the next pending episode, or leave the batch when none is left.

Rows may use different adapters in one forward pass; when every request uses the same
adapter (exploration, evaluation) it is merged into the weights for the rollout instead.
Sampling uses one seeded generator per episode, drawn once per produced token, so an
episode's draws depend neither on its batch neighbours nor on the drafts.

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
from fedse.agent.kvcache import ATTENTION_NAME, RowCache
from fedse.agent.lookup import PromptLookup
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
MAX_DRAFT = 15  # draft tokens a row may feed after its sampled token
# The block-width cost model, from SmolLM2-135M in fp32 on a 2-core CPU: a one-row pass costs
# ~35 ms (reading the weights) against ~1.2 ms per token in a wide pass, and reading one cached
# key of all layers ~3 us. On a GPU wider blocks would pay; these are not tuned there.
PASS_OVERHEAD = 32  # a pass's fixed cost, in tokens' worth of compute
KEYS_PER_TOKEN = 512  # cached keys whose reading costs about as much as computing one token
SCORES_PER_PASS = 2**27  # attention scores one pass may hold (512 MB in fp32)


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
    """Tokens kept in the context (prompt and generated): padding and rejected drafts not counted."""
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    forward_passes: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        s = max(self.seconds, 1e-9)
        text = (
            f"{self.episodes} episodes, {self.turns} turns in {self.seconds:.1f} s: {self.episodes / s:.3f} episodes/s, "
            f"{self.generated_tokens / s:.1f} generated tok/s, {self.processed_tokens / s:.1f} processed tok/s"
        )
        if self.drafted_tokens:
            text += f"; drafts accepted {self.accepted_tokens}/{self.drafted_tokens}"
        if self.forward_passes:
            text += f"; {self.forward_passes} forward passes"
        return text


# --- sampling ----------------------------------------------------------------------------


def sample_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> tuple[int, float]:
    """One token from a row of logits, and its log-probability under the model (temperature 1).

    Drawn on the CPU with the episode's CPU generator, whatever device the logits come from,
    so a seed gives the same draws on any machine."""
    logits = logits.float().cpu()
    logprobs = torch.log_softmax(logits, dim=-1)
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
    context: PromptLookup = field(default_factory=PromptLookup)
    """Every token in this episode's cache row, indexed for drafting."""
    status: str = "prompt"  # prompt (observation queued) -> gen -> prompt ... -> finished
    next_token: int | None = None
    gen_ids: list[int] = field(default_factory=list)
    gen_logprobs: list[float] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    turns: int = 0
    reward: float = 0.0
    success: bool = False
    finish: str = ""

    @property
    def length(self) -> int:
        return len(self.context)


@functools.cache
def _return_large_buffers_to_the_os() -> None:
    """Have glibc serve allocations of 4 MB and more with mmap, so that freeing returns them.

    A rollout allocates attention buffers whose sizes drift from pass to pass. With glibc's
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
    def __init__(
        self,
        policy: Policy,
        max_batch: int = 32,
        max_context: int = 4096,
        progress: str | None = None,
        max_draft: int = MAX_DRAFT,
    ):
        _return_large_buffers_to_the_os()
        self.policy = policy
        self.layout = ChatLayout(policy.tokenizer)
        self.stop_ids = self.layout.stop_ids
        self.max_batch = max_batch
        self.max_context = min(max_context, getattr(policy.base.model.config, "max_position_embeddings", max_context))
        self.progress = progress
        self.query_heads = policy.base.model.config.num_attention_heads
        self.max_draft = max_draft
        self.pad_id = policy.tokenizer.pad_token_id or 0
        self._prefixes: dict[tuple[str, str | None], tuple[RowCache, list[int]]] = {}
        self._finished: list[_Episode] = []
        self._drafted = self._accepted = 0  # this run's drafts, for the block width

    # --- public --------------------------------------------------------------------------

    @torch.no_grad()
    def run(self, requests: list[RolloutRequest], stats: RolloutStats | None = None) -> list[Trajectory]:
        stats = stats if stats is not None else RolloutStats()
        start = time.perf_counter()
        self._prefixes.clear()
        self._drafted = self._accepted = 0
        pending = deque(self._start(i, r) for i, r in enumerate(requests))
        done: list[_Episode] = []
        rows: list[_Episode | None] = []
        cache: RowCache | None = None
        bar = _progress_bar(len(requests), self.progress) if self.progress else None
        adapters = {r.adapter for r in requests}
        # One adapter (by content) for the whole rollout, e.g. every client exploring from the
        # same global adapter: fold it into the weights.
        single = None not in adapters and len({self.policy.hash_of(a) for a in adapters}) == 1
        merged = self.policy.merged(next(iter(adapters))) if single else nullcontext()
        with self.policy.attention(ATTENTION_NAME), merged:
            while pending or any(rows):
                if cache is None:
                    rows = [None] * min(self.max_batch, len(pending))
                    cache = self._new_cache(len(rows), 256)
                for i, e in enumerate(rows):
                    if e is None and pending:
                        rows[i] = self._admit(cache, i, pending.popleft(), stats)
                idle = sum(e is None for e in rows)
                if idle >= max(1, len(rows) // 8):  # nothing pending: shrink the batch
                    order = cache.pack([i for i, e in enumerate(rows) if e is not None])
                    rows = [rows[i] for i in order]
                self._forward_block(cache, rows, stats)
                finished, self._finished = self._finished, []
                rows = [None if e is not None and e.status == "finished" else e for e in rows]
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

    def _admit(self, cache: RowCache, row: int, e: _Episode, stats: RolloutStats) -> _Episode:
        """Start episode `e` in `row`: its environment's shared prefix is copied in, its first
        observation queued."""
        key = (e.env.instruction, e.request.adapter)
        if key not in self._prefixes:
            ids = self.layout.encode(self.layout.prefix_text(e.env.instruction))
            prefix = self._new_cache(1, len(ids))
            ids_tensor = torch.tensor([ids], device=self.policy.device)
            self._forward(prefix, [e.request.adapter], ids_tensor, [])  # only the cache is kept
            prefix.commit([len(ids)])
            stats.processed_tokens += len(ids)
            self._prefixes[key] = (prefix, ids)
        prefix, ids = self._prefixes[key]
        cache.set_row(row, prefix)
        e.context.extend(ids)
        return e

    def _forward_block(self, cache: RowCache, rows: list[_Episode | None], stats: RolloutStats) -> None:
        """One forward pass: each generating row feeds its sampled token and drafts, each
        prompting row the next chunk of its observation; then every row takes its results."""
        span = int(cache.lengths.max())
        max_width = max(1, SCORES_PER_PASS // (len(rows) * self.query_heads * (span + 64)))
        feeds, firm = self._feeds(rows, max_width)
        width = self._block_width([len(f) for f in feeds.values()], list(firm.values()), len(rows), span)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for i, f in feeds.items():
            feeds[i] = f = f[:width]
            ids[i, : len(f)] = torch.tensor(f)
        live = next(e.request.adapter for e in rows if e is not None)
        adapters = [e.request.adapter if e is not None else live for e in rows]  # empty rows: any live one's
        # The positions that produce a token: every fed position of a generating row, the last
        # one of a prompt that is now complete.
        wanted = [
            (i, j)
            for i, f in feeds.items()
            for j in (
                range(len(f)) if rows[i].status == "gen" else [len(f) - 1] if len(f) == len(rows[i].queue) else []
            )
        ]
        where = {pos: k for k, pos in enumerate(wanted)}
        picked = self._forward(cache, adapters, ids.to(self.policy.device), wanted).float()
        stats.forward_passes += 1
        logprobs = torch.log_softmax(picked, dim=-1)
        best = logprobs.argmax(-1)
        best_logprob = logprobs.gather(1, best[:, None])[:, 0].tolist()  # one transfer, not one per token
        best = best.tolist()

        def produce(e: _Episode, i: int, j: int) -> bool:
            """Choose the token at (row i, position j); True when it ends the turn."""
            k = where[(i, j)]
            if e.request.sampling.temperature <= 0:
                return self._take(e, best[k], best_logprob[k])
            return self._take(e, *sample_token(picked[k], e.request.sampling, e.generator))

        for i, f in feeds.items():
            e = rows[i]
            if e.status == "prompt":
                e.context.extend(f)
                e.queue = e.queue[len(f) :]
                e.prompt_tokens += len(f)
                stats.processed_tokens += len(f)
                if not e.queue:
                    e.status = "gen"
                    if produce(e, i, len(f) - 1):
                        self._end_turn(e, stats)
                continue
            stats.drafted_tokens += len(f) - 1
            self._drafted += len(f) - 1
            for j, token in enumerate(f):
                e.context.extend([token])
                stats.processed_tokens += 1
                ended = produce(e, i, j)
                if ended:
                    self._end_turn(e, stats)
                    break
                if j + 1 == len(f) or f[j + 1] != e.next_token:
                    break
                stats.accepted_tokens += 1
                self._accepted += 1
        cache.commit([e.length if e is not None and e.status != "finished" else 0 for e in rows])

    def _feeds(self, rows: list[_Episode | None], max_width: int) -> tuple[dict[int, list[int]], dict[int, int]]:
        """What each live row would feed at most: its observation's next chunk, or its sampled
        token and drafts; and how many of those tokens are surely kept (the rest are drafts)."""
        feeds: dict[int, list[int]] = {}
        firm: dict[int, int] = {}
        for i, e in enumerate(rows):
            if e is None:
                continue
            if e.status == "prompt":
                feeds[i] = e.queue[:max_width]
                firm[i] = len(feeds[i])
            else:
                room = e.request.sampling.max_new_tokens - len(e.gen_ids) - 1  # tokens a draft could add
                feeds[i] = [e.next_token, *e.context.draft(e.next_token, min(self.max_draft, room, max_width - 1))]
                firm[i] = 1
        return feeds, firm

    def _block_width(self, wants: list[int], firm: list[int], rows: int, span: int) -> int:
        """The block width with the most expected useful tokens per unit of cost.

        A pass costs rows x width tokens of compute plus a fixed part (weights, and the KV
        cache every row reads); a row's token counts as useful if it is firm (prompt, or the
        sampled token), a draft counts at the acceptance rate seen so far in this rollout.
        """
        accept = (self._accepted + 1) / (self._drafted + 2)
        fixed = PASS_OVERHEAD + rows * span / KEYS_PER_TOKEN

        def value(width: int) -> float:
            useful = sum(min(f, width) + accept * max(0, min(w, width) - f) for w, f in zip(wants, firm, strict=True))
            return useful / (rows * width + fixed)

        return max(sorted(set(wants)), key=value)

    def _take(self, e: _Episode, token: int, logprob: float) -> bool:
        """Record the next token of `e`'s turn; True when the turn has ended."""
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

    def _new_cache(self, batch: int, capacity: int) -> RowCache:
        model = self.policy.base.model
        return RowCache.for_model(model.config, batch, model.dtype, self.policy.device, capacity=capacity)

    def _forward(self, cache: RowCache, adapters, ids, positions: list[tuple[int, int]]) -> torch.Tensor:
        """Run a block; the logits (N, V) of the (row, column) `positions` only."""
        pos, mask = cache.begin_block(ids.shape[1])
        # The output layer runs on the wanted positions only: it is a fifth of the model's
        # compute per token, and most prompt positions need no logits.
        index = torch.tensor(positions, dtype=torch.long, device=ids.device).reshape(-1, 2).unbind(1)
        head = self.policy.base.model.get_output_embeddings()
        hook = head.register_forward_pre_hook(lambda _module, args: (args[0][index],), prepend=True)
        try:
            return self.policy.forward(
                adapters, input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True
            )
        finally:
            hook.remove()


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
