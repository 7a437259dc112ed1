"""Environments of one's own that go wrong, for the tests of `fedse.envs`' plugin loading (the one
that works is the example package's, examples/ticket-routing)."""

from acme_tickets import TicketRouting

from fedse.envs import StepResult, TextEnv
from fedse.envs.base import parse_action_single_line


class NoExpert(TicketRouting):
    """The example's game without its scripted expert."""

    expert = TextEnv.expert


class NotAnEnv:
    name = "x"


class Unfinished(TextEnv):
    name, instruction, max_turns, num_tasks = "u", "", 1, 1


class Echo(TextEnv):
    """A game written from scratch with its attributes set by its constructor (none on the class)
    and its splits as lists: say the word the task shows."""

    WORDS = ("apple", "river", "stone", "cloud", "maple", "ember", "frost", "grove")

    def __init__(self, tasks: int = 8) -> None:
        super().__init__()
        self.instruction = "Repeat the word you are shown.\nThought: ...\nAction: say <word>"
        self.max_turns, self.num_tasks = 2, tasks
        self.splits = {"train": [i for i in range(tasks) if i % 4], "test": [i for i in range(tasks) if not i % 4]}

    def word(self, task_id: int) -> str:
        return self.WORDS[task_id % len(self.WORDS)]

    def start_task(self, task_id: int) -> str:
        return f"The word is {self.word(task_id)}."

    def parse_action(self, model_output: str) -> str | None:
        return parse_action_single_line(model_output)

    def act(self, action: str) -> StepResult:
        said = action == f"say {self.word(self.task_id)}"
        return StepResult("Correct." if said else "Wrong.", float(said), True, said, action)

    def expert(self, task_id: int) -> list[str]:
        return [f"Thought: I repeat it.\nAction: say {self.word(task_id)}"]


class BadTurns(TicketRouting):
    max_turns = 0


def small_echo() -> Echo:
    """An entry point may name a function that builds the environment."""
    return Echo(tasks=8)


def not_an_env() -> NotAnEnv:
    return NotAnEnv()
