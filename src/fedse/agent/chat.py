"""The conversation layout: how an episode becomes the model's chat format and token ids.

An episode is, as in AgentGym: user = instruction, assistant = a fixed acknowledgement,
then user = observation / assistant = model output, turn after turn. The text comes from
the tokenizer's own chat template. Token ids are built piece by piece, cutting the rendered
text at the edges of the assistant's contents, so that the ids the rollout engine feeds
(which keep the model's own generated ids) and the ids training sees line up exactly.

Training loss covers the agent's turns only: each assistant content (Thought + Action)
and the end-of-turn token that closes it (so the model learns to stop), never the
instruction, the acknowledgement or the observations.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from fedse.envs.base import ACK

Message = dict
"""{"role": "user" | "assistant", "content": str}, and optionally "loss": bool | None (an
imported AgentTraj turn's own flag: False keeps that assistant turn out of the loss)."""


def episode_messages(instruction: str, observations: list[str], outputs: list[str]) -> list[Message]:
    """[user instruction, assistant ACK, user obs0, assistant out1, user obs1, ...]."""
    if len(observations) not in (len(outputs), len(outputs) + 1):
        raise ValueError(f"{len(observations)} observations do not fit {len(outputs)} model outputs")
    messages = [{"role": "user", "content": instruction}, {"role": "assistant", "content": ACK}]
    for i, observation in enumerate(observations):
        messages.append({"role": "user", "content": observation})
        if i < len(outputs):
            messages.append({"role": "assistant", "content": outputs[i]})
    return messages


@dataclass
class ChatLayout:
    tokenizer: PreTrainedTokenizerBase

    def render(self, messages: list[Message], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @property
    def stop_ids(self) -> set[int]:
        """Token ids that end an assistant turn."""
        ids = {self.tokenizer.eos_token_id}
        end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(end, int) and end != self.tokenizer.unk_token_id:
            ids.add(end)
        return {i for i in ids if i is not None}

    def prefix_text(self, instruction: str, acknowledgement: str = ACK) -> str:
        """The text shared by every episode of an environment (system, instruction, ACK); an
        imported AgentTraj episode brings its own acknowledgement."""
        messages = [{"role": "user", "content": instruction}, {"role": "assistant", "content": acknowledgement}]
        return self.render(messages, generation_prompt=False)

    def continuation(self, messages: list[Message], consumed: str) -> str:
        """The text to feed after `consumed` so the model answers the last message of `messages`."""
        full = self.render(messages, generation_prompt=True)
        if not full.startswith(consumed):
            raise ValueError(
                "the chat template rewrites earlier turns when a message is added; "
                "fedse needs a template that only appends (e.g. ChatML)"
            )
        return full[len(consumed) :]

    def encode_episode(self, messages: list[Message]) -> tuple[list[int], list[int]]:
        """Token ids of a whole episode and its loss mask.

        The mask is 1 on every assistant content after the acknowledgement and on the
        end-of-turn token right after it, except contents whose message says "loss": False;
        0 elsewhere.
        """
        consumed = self.prefix_text(messages[0]["content"], messages[1]["content"])
        pieces: list[tuple[list[int], bool]] = [(self.encode(consumed), False)]
        for k in range(2, len(messages)):
            if messages[k]["role"] != "assistant":
                continue
            head = self.continuation(messages[:k], consumed)  # observation + assistant header
            content = messages[k]["content"]
            trained = messages[k].get("loss") is not False
            pieces += [(self.encode(head), False), (self.encode(content), trained)]
            consumed += head + content
        tail = self.render(messages, generation_prompt=False)[len(consumed) :]
        pieces.append((self.encode(tail), False))
        ids: list[int] = []
        mask: list[int] = []
        after_agent = False
        for piece, agent in pieces:
            ids += piece
            mask += [int(agent)] * len(piece)
            if after_agent and not agent and piece and piece[0] in self.stop_ids:
                mask[len(ids) - len(piece)] = 1
            after_agent = agent
        return ids, mask
