"""Environments of one's own that go wrong, for the tests of `fedse.envs`' plugin loading (the one
that works is the example package's, examples/ticket-routing)."""

from acme_tickets import TicketRouting

from fedse.envs import TextEnv


class NoExpert(TicketRouting):
    """The example's game without its scripted expert."""

    expert = TextEnv.expert


class NotAnEnv:
    name = "x"


class Unfinished(TextEnv):
    name, instruction, max_turns, num_tasks = "u", "", 1, 1
