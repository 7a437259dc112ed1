"""Ticket routing at a support desk: read a customer's ticket, send it to the queue that owns it.

A few hundred tickets are generated from templates (a product, a symptom, a customer's phrasing);
each symptom belongs to one queue. The agent answers `Action: route <queue>`; a wrong queue sends
the ticket back with a hint of why, and the agent may try again until `max_turns`. The scripted
expert reads the symptom and routes it on the first turn.
"""

from __future__ import annotations

import random

from fedse.envs import StepResult, TextEnv
from fedse.envs.base import ONLY_ONE_ACTION, parse_action_single_line

QUEUES = {
    "billing": ["was charged twice", "cannot find my invoice", "want a refund"],
    "network": ["keeps dropping the connection", "shows no signal", "is very slow since yesterday"],
    "accounts": ["will not accept my password", "locked me out", "shows someone else's name"],
    "hardware": ["does not turn on", "makes a clicking noise", "has a cracked screen"],
}
PRODUCTS = ["router", "phone plan", "laptop", "smart meter", "tablet"]
OPENINGS = ["Hello,", "Hi team,", "Urgent:", "Good morning,", "Please help:"]
SYMPTOMS = [(queue, symptom) for queue, symptoms in QUEUES.items() for symptom in symptoms]
NUM_TICKETS = len(SYMPTOMS) * len(PRODUCTS) * len(OPENINGS)  # 300


def ticket(task_id: int) -> tuple[str, str, str]:
    """(queue, symptom, text) of ticket `task_id`, the same on every machine."""
    rng = random.Random(task_id)
    queue, symptom = SYMPTOMS[task_id % len(SYMPTOMS)]
    product = PRODUCTS[(task_id // len(SYMPTOMS)) % len(PRODUCTS)]
    opening = OPENINGS[rng.randrange(len(OPENINGS))]
    return queue, symptom, f"{opening} my {product} {symptom}. Customer #{1000 + task_id}."


class TicketRouting(TextEnv):
    name = "tickets"
    instruction = (
        "You work at a support desk. Each ticket belongs to one queue: "
        + ", ".join(QUEUES)
        + ". Read the ticket, think, and answer in the form\nThought: ...\nAction: route <queue>"
    )
    max_turns = 3
    num_tasks = NUM_TICKETS
    rejection = ONLY_ONE_ACTION

    def __init__(self, tickets: int = NUM_TICKETS) -> None:
        super().__init__()
        self.tickets = min(tickets, NUM_TICKETS)

    @property
    def splits(self) -> dict[str, tuple[int, ...]]:
        """Every fifth ticket is a test ticket; the rest are for training."""
        ids = range(self.tickets)
        return {"train": tuple(i for i in ids if i % 5), "test": tuple(i for i in ids if i % 5 == 0)}

    def start_task(self, task_id: int) -> str:
        return f"New ticket: {ticket(task_id)[2]}"

    def parse_action(self, model_output: str) -> str | None:
        return parse_action_single_line(model_output)

    def act(self, action: str) -> StepResult:
        queue, symptom, _ = ticket(self.task_id)
        chosen = action.removeprefix("route ").strip()
        if action.startswith("route ") and chosen == queue:
            return StepResult(f"Routed to {queue}. The customer is helped.", 1.0, True, True, action)
        last = self.turns + 1 >= self.max_turns
        if not action.startswith("route ") or chosen not in QUEUES:
            text = f"Not a queue. Answer 'Action: route <queue>' with one of: {', '.join(QUEUES)}."
        else:
            text = f"The {chosen} team sent it back: '{symptom}' is not theirs."
        return StepResult(text, 0.0, last, False, action)

    def expert(self, task_id: int) -> list[str]:
        queue, symptom, _ = ticket(self.check_task_id(task_id))
        return [f"Thought: the customer says it {symptom}; that belongs to {queue}.\nAction: route {queue}"]
