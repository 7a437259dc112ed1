"""BabyAI's expert: minigrid's BabyAI bot, its primitive plan compressed into the listed macro-actions.

The expert seeds the self-evolution buffers, so it must solve every task it is given within
the turn limit where that is possible. It plays on copies of the world and reads only the
environment's public state (`world`, `view`, `image`, `goal`).
"""

from __future__ import annotations

import copy

from fedse.envs.babyai import BabyAIEnv, run_primitives

PLANNERS = ("layout", "explore", "open_doors")
"""How the expert's bot plans (see `bot_plan`)."""
_DOOR = 4  # minigrid's object index of doors


def _state_key(world, door_states: bool = True) -> tuple:
    """What decides the future of an episode: agent pose, carried object, grid, mission progress."""
    carrying = world.carrying
    grid = world.grid.encode()
    if not door_states:  # closed counts as open (state channel 1 -> 0 on door cells)
        doors = (grid[:, :, 0] == _DOOR) & (grid[:, :, 2] == 1)
        grid[doors, 2] = 0
    return (
        tuple(int(v) for v in world.agent_pos),
        int(world.agent_dir),
        None if carrying is None else (carrying.type, carrying.color),
        grid.tobytes(),
        _instr_progress(world.instrs),
    )


def _instr_progress(instr) -> tuple | None:
    if hasattr(instr, "instr_a"):
        return (instr.a_done, instr.b_done, _instr_progress(instr.instr_a), _instr_progress(instr.instr_b))
    return None


def planning_world(world, planner: str):
    """A copy of `world` for the bot to plan in; "open_doors" opens every closed, unlocked door."""
    sim = copy.deepcopy(world)
    if planner == "open_doors":
        for cell in sim.grid.grid:
            if cell is not None and cell.type == "door" and not cell.is_locked:
                cell.is_open = True
    return sim


def _seen_without_keys(world):
    """Walls, doors and every cell the agent reaches without unlocking a door."""
    import numpy as np

    grid = world.grid
    seen = np.zeros((grid.width, grid.height), dtype=bool)
    stack = [tuple(int(v) for v in world.agent_pos)]
    while stack:
        x, y = stack.pop()
        if not (0 <= x < grid.width and 0 <= y < grid.height) or seen[x, y]:
            continue
        seen[x, y] = True
        cell = grid.get(x, y)
        if cell is None or (cell.type != "wall" and not (cell.type == "door" and cell.is_locked)):
            stack += [(x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)]
    for x in range(grid.width):
        for y in range(grid.height):
            cell = grid.get(x, y)
            seen[x, y] |= cell is not None and cell.type in ("wall", "door")
    return seen


def bot_plan(world, planner: str, limit: int = 500) -> list[int] | None:
    """Primitive actions of minigrid's BabyAI bot from `world`'s state to success (on a copy).

    "explore" is the bot as minigrid ships it: it sweeps rooms until it sees what the
    mission needs. An expert may know the map, so "layout" starts the bot having seen
    every wall and door but no object (it heads for unexplored rooms directly), and
    "open_doors" plans in a copy with every unlocked door open, having seen everything
    short of locked doors (telling the bot about objects behind closed or locked doors
    trips its path assertions).
    None if the bot fails or asserts.
    """
    from minigrid.utils.baby_ai_bot import BabyAIBot

    sim = planning_world(world, planner)
    bot = BabyAIBot(sim)
    if planner == "layout":
        for x in range(sim.grid.width):
            for y in range(sim.grid.height):
                cell = sim.grid.get(x, y)
                bot.vis_mask[x, y] = cell is None or cell.type in ("wall", "door")
    elif planner == "open_doors":
        bot.vis_mask[:] = _seen_without_keys(sim)
    plan: list[int] = []
    try:
        action = bot.replan()
        while len(plan) < limit:
            _, reward, terminated, _, _ = sim.step(action)
            plan.append(int(action))
            if terminated:
                return plan if reward > 0 else None
            action = bot.replan()
    except AssertionError:
        return None
    return None


_THOUGHTS = {
    "turn left": "I turn left to face the way I need to go.",
    "turn right": "I turn right to face the way I need to go.",
    "move forward": "I move forward.",
    "drop": "I put down what I am carrying here.",
    "toggle": "I open the door in front of me.",
    "go to goal": "I go to the goal square.",
}


def _thought(action: str, goal: str) -> str:
    if action in _THOUGHTS:
        return _THOUGHTS[action]
    target = action.rsplit(" ", 1)[0]
    for verb, text in (
        ("toggle and go through ", "I open the {} and go through it."),
        ("go through ", "I go through the {}."),
        ("pickup ", "I pick up the {}."),
        ("go to ", "I go to the {}."),
    ):
        if target.startswith(verb):
            return text.format(target[len(verb) :])
    return f"This brings me closer to: {goal}."


class BabyAIExpert:
    """Solves a task with minigrid's BabyAI bot, compressed into the listed macro-actions.

    The bot plans in primitives (turn, forward, pickup, drop, toggle). Each turn, every
    listed action is tried on a copy of the world; the one that accomplishes the mission,
    or else reaches the state furthest along the bot's plan, is taken. When no listed
    action lands on the plan, the bot replans from the current state. Each of the
    `PLANNERS` plays the task; the shortest success is kept.
    """

    def solve(self, task_id: int, max_turns: int) -> list[str]:
        """The shortest successful play over the planners, else the longest try."""
        tries = [self._play(task_id, max_turns, planner) for planner in PLANNERS]
        solved = [outputs for outputs, done in tries if done]
        return min(solved, key=len) if solved else max((o for o, _ in tries), key=len)

    def _play(self, task_id: int, max_turns: int, planner: str) -> tuple[list[str], bool]:
        game = BabyAIEnv()
        game.reset(task_id)
        plan = bot_plan(game.world, planner) or []
        outputs: list[str] = []
        while len(outputs) < max_turns:
            action, consumed = self._choose(game, plan, planner)
            if action is None:
                plan = bot_plan(game.world, planner) or []
                action, consumed = self._choose(game, plan, planner)
                if action is None:
                    break
            output = f"Thought: {_thought(action, game.goal)}\nAction: {action}"
            outputs.append(output)
            if game.step(output).done:
                return outputs, True
            plan = plan[consumed:] if consumed else bot_plan(game.world, planner) or []
        return outputs, False

    @staticmethod
    def _choose(game: BabyAIEnv, plan: list[int], planner: str) -> tuple[str | None, int]:
        """(action, plan steps it covers); plan steps 0 means the action finished the mission."""
        door_states = planner != "open_doors"
        sim = planning_world(game.world, planner)
        along: dict[tuple, int] = {}
        for i, primitive in enumerate(plan, start=1):
            sim.step(primitive)
            along[_state_key(sim, door_states)] = i
        best, best_covered = None, 0
        for action, primitives in game.view.actions.items():
            if not primitives:
                continue
            sim = copy.deepcopy(game.world)
            _, reward, terminated = run_primitives(sim, primitives, game.image)
            if terminated and reward > 0.5:
                return action, 0
            covered = along.get(_state_key(sim, door_states), 0)
            if covered > best_covered:
                best, best_covered = action, covered
        return best, best_covered
