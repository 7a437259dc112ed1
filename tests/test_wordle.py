"""Wordle feedback, lazy target sampling, validity and the six-guess limit (docs/environments.md)."""

import random

from fedse.envs import make_env
from fedse.envs.wordle import INVALID, START, VOCAB, consistent, feedback


def test_seed_zero_feedback_matches_agentgym():
    env = make_env("wordle")
    assert env.reset(0) == START
    assert env.step("Thought: start.\nAction: p a n i c").observation == "b y b b b\n"
    assert env.step("Action: s o l a r").observation == "b y b y y\n"
    assert env.step("Action: xxxxx").observation == INVALID


def test_invalid_guesses_are_rejected_without_newline():
    env = make_env("wordle")
    env.reset(0)
    for output in ["Action: P A N I C", "Action: zzzzz", "Action: p a n", "no action marker at all"]:
        result = env.step(output)
        assert (result.observation, result.reward, result.done) == (INVALID, 0.0, False)


def test_guess_without_spaces_or_marker_is_accepted():
    env = make_env("wordle")
    env.reset(0)
    assert env.step("panic").observation == "b y b b b\n"


def test_two_action_lines_use_the_first():
    env = make_env("wordle")
    env.reset(0)
    result = env.step("Action: p a n i c\nAction: s o l a r")
    assert result.action == "p a n i c" and result.observation == "b y b b b\n"


def test_solving_gives_reward_one_and_done():
    env = make_env("wordle")
    env.reset(0)
    env.step("Action: p a n i c")
    env.step("Action: s o l a r")
    result = env.step("Action: a r o m a")
    assert (result.observation, result.reward, result.done, result.success) == ("g g g g g\n", 1.0, True, True)


def test_six_guesses_end_the_game_even_if_invalid():
    env = make_env("wordle")
    env.reset(0)
    results = [env.step("Action: q q q q q") for _ in range(6)]
    assert [r.done for r in results] == [False] * 5 + [True]
    assert results[-1].reward == 0.0 and not results[-1].success


def test_invalid_guesses_do_not_consume_the_rng():
    a, b = make_env("wordle"), make_env("wordle")
    a.reset(7)
    b.reset(7)
    a.step("Action: zzzzz")
    assert a.step("Action: p a n i c").observation == b.step("Action: p a n i c").observation


def test_feedback_has_no_duplicate_letter_accounting():
    assert feedback("skill", "knoll") == "b y b g g"
    assert feedback("aroma", "panic") == "y b b b y"


def test_target_is_drawn_from_consistent_words_in_vocab_order():
    env = make_env("wordle")
    env.reset(11)
    rng = random.Random(11)
    target = rng.choice(VOCAB)
    assert env.step("Action: p a n i c").observation == feedback("panic", target) + "\n"
    history = [("panic", feedback("panic", target))]
    second = rng.choice(consistent(VOCAB, history))
    assert env.step("Action: s o l a r").observation == feedback("solar", second) + "\n"
