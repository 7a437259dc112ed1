"""A tiny, randomly initialised Llama-style model with a small BPE chat tokenizer, built in code.

For tests and smoke runs (`load_base("tiny-random")`): it needs no file and no download, has
the same architecture family and chat format as the embedded model, and runs in milliseconds.
"""

from __future__ import annotations

from functools import cache

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A small byte-level BPE (lossless on any text) trained on the environments' own text,
    so test conversations are about four times shorter than at one token per byte."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_bpe(vocab_size)),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<|im_start|>",
    )
    tokenizer.chat_template = CHATML
    return tokenizer


@cache
def _trained_bpe(vocab_size: int) -> str:
    from fedse.envs import BUILT_IN_ENVS, make_env

    corpus = []
    for name in BUILT_IN_ENVS:  # the built-in games only: the same tokenizer whatever else is plugged in
        env = make_env(name)
        corpus += [env.instruction, env.reset(0), *env.expert(0)]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        show_progress=False,
    )
    core.train_from_iterator(corpus, trainer)
    return core.to_str()


def tiny_model(vocab_size: int, seed: int = 0, hidden: int = 64, layers: int = 2) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval().requires_grad_(False)
