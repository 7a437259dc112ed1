"""Wordle: LMRL-Gym's 40-word Wordle as AgentGym serves it (docs/environments.md).

The hidden word is sampled lazily, as upstream does: `reset(task_id)` seeds
`random.Random(task_id)` and every valid guess draws the target afresh from the words
(in vocabulary order) that agree with all feedback so far. Invalid guesses draw nothing.
Feedback per letter: `g` right letter in the right place, `y` letter somewhere in the
word (no duplicate-letter accounting), `b` absent. A guess is valid when, with spaces
removed, it is one of the 40 lower-case words. Six guesses end the game, invalid ones
included; reward 1 on the solving guess, 0 otherwise.

Deviation: AgentGym discards the server's reset observation and sends the rules as the
first observation; fedse puts the rules in `instruction` and keeps the reset observation.
The vocabulary is LMRL-Gym's `tweet_words.txt` (MIT, (c) 2022 Charlie Snell).
"""

from __future__ import annotations

import random

from fedse.envs.base import StepResult, TextEnv, parse_action_lmrl

VOCAB = (
    "panic solar shire proxy point robot prick wince crimp knoll sugar whack mount perky could wrung "
    "light those moist shard pleat aloft skill elder frame humor pause ulcer ultra robin cynic aroma "
    "caulk shake dodge swill tacit other thorn trove"
).split()
MAX_GUESSES = 6
START = "Let's start Wordle!"
INVALID = "invalid word"

INSTRUCTION = f"""\
Guess a hidden 5-letter word in at most 6 tries, using as few as you can.
Write a guess as its letters separated by spaces, e.g. s h i r e. After each guess you get \
5 letters, one per position: g = right letter, right place; y = the letter is in the word \
but elsewhere; b = the letter is not in the word. A guess that is not a word from the list \
gets "invalid word" and still uses a try.
The hidden word is one of: {", ".join(VOCAB)}.
Example: after "p a n i c" got "b y b b b", the word has an a (not in the middle) and no p, n, i, c.
Answer every observation in exactly this format:
Thought: <one short reason>
Action: <your guess>"""


def feedback(guess: str, target: str) -> str:
    return " ".join("g" if g == t else "y" if g in target else "b" for g, t in zip(guess, target, strict=True))


def consistent(words: list[str], history: list[tuple[str, str]]) -> list[str]:
    """The words (in order) that would have produced every (guess, feedback) seen."""
    return [w for w in words if all(feedback(g, w) == f for g, f in history)]


def spaced(word: str) -> str:
    return " ".join(word)


class WordleEnv(TextEnv):
    name = "wordle"
    instruction = INSTRUCTION
    max_turns = 8
    num_tasks = None

    def start_task(self, task_id: int) -> str:
        self.rng = random.Random(task_id)
        self.history: list[tuple[str, str]] = []
        self.guesses = 0
        return START

    def parse_action(self, model_output: str) -> str:
        return parse_action_lmrl(model_output)

    def act(self, action: str) -> StepResult:
        guess = action.replace(" ", "")
        self.guesses += 1
        out_of_guesses = self.guesses >= MAX_GUESSES
        if guess not in VOCAB:
            return StepResult(INVALID, 0.0, out_of_guesses, False, action)
        target = self.rng.choice(consistent(VOCAB, self.history))
        fb = feedback(guess, target)
        self.history.append((guess, fb))
        solved = guess == target
        return StepResult(fb + "\n", float(solved), solved or out_of_guesses, solved, action)

    def expert(self, task_id: int) -> list[str]:
        """Consistent-guess elimination: always guess the first word that fits all feedback."""
        game = WordleEnv()
        game.reset(self.check_task_id(task_id))
        outputs: list[str] = []
        while not game.done:
            candidates = consistent(VOCAB, game.history)
            guess = candidates[0]
            if not game.history:
                thought = f"No feedback yet, so any word can be right; I start with {guess}."
            elif len(candidates) == 1:
                thought = f"Only {guess} fits all the feedback so far."
            else:
                thought = f"{len(candidates)} words fit all the feedback so far; I try the first, {guess}."
            outputs.append(f"Thought: {thought}\nAction: {spaced(guess)}")
            game.step(outputs[-1])
        return outputs
