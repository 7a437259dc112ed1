"""Environments of one's own, for the tests of `fedse.envs`' plugin loading: a small ticket-routing
game with a scripted expert, one without an expert, and broken ones."""

from fedse.envs import StepResult, TextEnv
from fedse.envs.base import parse_action_single_line

QUEUES = ("billing", "network", "accounts")
TICKETS = [f"Ticket {i}: my {('invoice', 'router', 'password')[i % 3]} is wrong" for i in range(30)]


class TicketRouting(TextEnv):
    """Route a support ticket to the right queue in one action: `Action: route <queue>`."""

    name = "tickets"
    instruction = f"You route support tickets. Answer 'Action: route <queue>' with a queue among {', '.join(QUEUES)}."
    max_turns = 3
    num_tasks = len(TICKETS)

    def __init__(self, tasks: int = len(TICKETS)) -> None:
        super().__init__()
        self.tasks = tasks

    @property
    def splits(self) -> dict[str, tuple[int, ...]]:
        return {"train": tuple(range(0, self.tasks, 2)), "test": tuple(range(1, self.tasks, 2))}

    def start_task(self, task_id: int) -> str:
        return TICKETS[task_id]

    def parse_action(self, model_output: str) -> str | None:
        return parse_action_single_line(model_output)

    def act(self, action: str) -> StepResult:
        right = action == f"route {QUEUES[self.task_id % 3]}"
        done = right or self.turns + 1 >= self.max_turns
        return StepResult("Routed." if right else "Wrong queue.", float(right), done, right, action)

    def expert(self, task_id: int) -> list[str]:
        return [f"Thought: this is about {QUEUES[task_id % 3]}.\nAction: route {QUEUES[task_id % 3]}"]


class NoExpert(TicketRouting):
    name = "tickets-no-expert"
    expert = TextEnv.expert


class NotAnEnv:
    name = "x"


class Unfinished(TextEnv):
    name, instruction, max_turns, num_tasks = "u", "", 1, 1
