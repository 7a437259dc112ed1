"""One episode's life, shared by the batched engine and the reference loop.

An episode starts with its environment's first observation queued after the shared prefix
(system prompt, instruction, acknowledgement). Each turn the model's tokens are taken one by
one (`take`) until a stop token or `max_new_tokens`; `end_turn` decodes them, steps the
environment, and either queues the reply (only the new observation, in the chat template's
format) or finishes the episode: when the environment says done, at `max_turns`, or when
the next turn would not fit `max_context`. `trajectory` is what a finished episode becomes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import Enum

import torch

from fedse.agent.chat import ChatLayout, Message, episode_messages
from fedse.agent.lookup import PromptLookup
from fedse.agent.rollout.types import RolloutRequest, RolloutStats
from fedse.agent.trajectory import Trajectory
from fedse.envs import EnvServerError, StepResult, TextEnv

log = logging.getLogger(__name__)


class Status(Enum):
    PROMPT = "prompt"
    """An observation is queued to be fed."""
    GENERATING = "generating"
    """The model is writing its turn."""
    FINISHED = "finished"


@dataclass(eq=False)  # an episode is itself: compared by identity
class Episode:
    index: int
    """Position of the request, so results come back in request order."""
    request: RolloutRequest
    env: TextEnv
    messages: list[Message]
    consumed: str
    """The chat text fed so far or queued (the rendering of `messages` up to the last reply)."""
    queue: list[int]
    """Token ids still to be fed before the model answers."""
    generator: torch.Generator
    max_turns: int
    context: PromptLookup = field(default_factory=PromptLookup)
    """Every token fed for this episode (its cache row), indexed for drafting."""
    status: Status = Status.PROMPT
    next_token: int | None = None
    """The token just sampled and not yet fed."""
    gen_ids: list[int] = field(default_factory=list)
    gen_logprobs: list[float] = field(default_factory=list)
    logprobs: list[list[float]] = field(default_factory=list)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    turns: int = 0
    reward: float = 0.0
    success: bool = False
    finish: str = ""
    finish_reason: str = ""
    """Set when something other than the environment's own `done` ends the episode early."""

    @property
    def length(self) -> int:
        return len(self.context)

    def take(self, token: int, logprob: float, stop_ids: set[int]) -> bool:
        """Record the next token of this turn; True when the turn has ended."""
        self.gen_logprobs.append(logprob)
        self.generated_tokens += 1
        if token in stop_ids:
            self.next_token = None
            return True
        self.gen_ids.append(token)
        self.next_token = token
        return len(self.gen_ids) >= self.request.sampling.max_new_tokens

    def end_turn(self, layout: ChatLayout, max_context: int, stats: RolloutStats) -> None:
        """Play the finished turn in the environment; queue the reply or finish the episode."""
        text = layout.tokenizer.decode(self.gen_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        unfed = [self.next_token] if self.next_token is not None else []  # the turn hit max_new_tokens
        try:
            result = self.env.step(text)
        except EnvServerError:
            raise  # a server that is down ends the round loudly, not this episode quietly
        except Exception as error:  # one environment's bug ends its own episode, not the batch
            log.warning(
                "%s task %s: step() raised %r; the episode ends unsuccessful",
                self.env.name,
                self.request.task_id,
                error,
            )
            result = StepResult(f"(the environment failed: {type(error).__name__})", 0.0, True, False, "")
            self.finish_reason = "env_error"
        stats.turns += 1
        stats.generated_tokens += len(self.gen_logprobs)
        self.turns += 1
        self.logprobs.append(self.gen_logprobs)
        self.messages += [{"role": "assistant", "content": text}, {"role": "user", "content": result.observation}]
        self.reward, self.success = result.reward, result.success
        self.gen_ids, self.gen_logprobs, self.next_token = [], [], None
        if self.finish_reason:
            self.finish = self.finish_reason
        elif result.done:
            self.finish = "done"
        elif self.turns >= self.max_turns:
            self.finish = "max_turns"
        else:
            suffix = layout.continuation(self.messages, self.consumed + text)
            queue = unfed + layout.encode(suffix)
            if self.length + len(queue) + self.request.sampling.max_new_tokens <= max_context:
                self.consumed += text + suffix
                self.queue, self.status = queue, Status.PROMPT
                return
            self.finish = "context"
        self.status = Status.FINISHED
        self.env.close()  # a server-side game (RemoteEnv) is freed as soon as its episode ends

    def trajectory(self, adapter_hash: str | None) -> Trajectory:
        return Trajectory(
            env=self.env.name,
            task_id=self.request.task_id,
            messages=self.messages,
            reward=self.reward,
            success=self.success,
            turns=self.turns,
            adapter=adapter_hash,
            finish=self.finish,
            seed=self.request.seed,
            prompt_tokens=self.prompt_tokens,
            generated_tokens=self.generated_tokens,
            logprobs=self.logprobs,
        )


def start_episode(index: int, request: RolloutRequest, layout: ChatLayout) -> Episode:
    """A new episode with its first observation queued. Its context is still empty: the caller
    feeds (or copies in) the shared prefix, `layout.prefix_text(env.instruction)`, first."""
    env = request.make_env()
    observation = env.reset(request.task_id)
    messages = episode_messages(env.instruction, [observation], [])
    prefix = layout.prefix_text(env.instruction)
    text = layout.continuation(messages, prefix)
    return Episode(
        index=index,
        request=request,
        env=env,
        messages=messages,
        consumed=prefix + text,
        queue=layout.encode(text),
        generator=torch.Generator().manual_seed(request.seed),
        max_turns=request.max_turns or env.max_turns,
    )
