"""The conversation layout: chat format, token ids and the loss mask on agent turns only."""

import pytest

from fedse.agent.chat import ChatLayout, episode_messages
from fedse.agent.tiny import byte_tokenizer
from fedse.envs import make_env

OUTPUTS = ["Thought: The way right is open.\nAction: move right", "Thought: Down is open.\nAction: move down"]


def maze_messages():
    env = make_env("maze")
    observations = [env.reset(0)] + [env.step(o).observation for o in OUTPUTS]
    return episode_messages(env.instruction, observations, OUTPUTS)


def check_mask(layout: ChatLayout, messages):
    ids, mask = layout.encode_episode(messages)
    assert len(ids) == len(mask)
    end = layout.tokenizer.eos_token
    spans, current = [], []
    for token, m in zip(ids, mask, strict=True):
        if m:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    decoded = [layout.tokenizer.decode(span) for span in spans + ([current] if current else [])]
    assert decoded == [o + end for o in OUTPUTS]
    # the unmasked tokens hold the instruction, acknowledgement and every observation
    rest = layout.tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if not m])
    assert all(m["content"] in rest for m in messages[0::2]) and "OK." in rest
    # and the ids are exactly the tokenization of the rendered conversation
    assert layout.tokenizer.decode(ids) == layout.render(messages, generation_prompt=False)


def test_episode_messages_alternate_user_and_assistant():
    messages = maze_messages()
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user", "assistant", "user"]
    assert messages[1]["content"] == "OK."
    with pytest.raises(ValueError, match="do not fit"):
        episode_messages("x", ["a"], ["b", "c"])


def test_loss_mask_covers_exactly_the_agent_turns_tiny_tokenizer():
    check_mask(ChatLayout(byte_tokenizer()), maze_messages())


@pytest.mark.slow
def test_loss_mask_covers_exactly_the_agent_turns_smollm2(smollm2):
    check_mask(ChatLayout(smollm2.tokenizer), maze_messages())


def test_continuation_is_only_the_new_text():
    layout = ChatLayout(byte_tokenizer())
    messages = maze_messages()
    consumed = layout.render(messages[:4], generation_prompt=False).removesuffix("\n").removesuffix("<|im_end|>")
    assert layout.continuation(messages[:5], consumed) == "<|im_end|>\n<|im_start|>user\n" + messages[4]["content"] + (
        "<|im_end|>\n<|im_start|>assistant\n"
    )
