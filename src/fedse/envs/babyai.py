"""BabyAI: minigrid's grid-world missions played through AgentGym's text layer (environments.md §3).

Task id k plays level `LEVELS[k % 40]` with seed `k // 40` (AgentGym's indexing; the
AgentEval/AgentTraj splits use 18 of the 40 levels). Dynamics come from the `minigrid`
package; the text the agent reads and the macro-actions it may take come from
`fedse.envs.babyai_text`. `BabyAI-GoToObjS6-v0` is registered with room size 4, as
minigrid 2.3.1 (AgentGym's pin) did, so the task instances are AgentGym's.

Observations: the first is "Your goal: <mission>\\n<description>\\nAvailable actions: [...]",
later ones the new description (or a message) and the action list again. A macro-action
runs its primitives one by one and stops early when one of them leaves the view unchanged.

Reward and success. minigrid pays 1 - 0.9 * steps / max_steps when the mission is
accomplished. AgentGym's wrapper ends the episode only if that exceeds 0.5 (a late success
does not end it) and reports the running sum of the wrapper's rewards as the score; we
return that score as `reward`. Since that is almost never exactly 1, `success` means the
episode ended with the mission accomplished (Fed-SE's BabyAI success, paper §4).
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from functools import cache

from fedse.envs.babyai_text import action_list_text, read_view
from fedse.envs.base import ONLY_ONE_ACTION, EnvError, StepResult, TextEnv, parse_action_single_line

LEVELS = (
    "GoToRedBallGrey", "GoToRedBall", "GoToRedBallNoDists", "GoToObjS6", "GoToLocalS8N7",
    "GoToObjMazeS7", "GoToImpUnlock", "GoToSeqS5R2", "GoToRedBlueBall", "GoToDoor",
    "GoToObjDoor", "Open", "OpenRedDoor", "OpenDoorLoc", "OpenRedBlueDoorsDebug",
    "OpenDoorsOrderN4Debug", "Pickup", "UnblockPickup", "PickupLoc", "PickupDistDebug",
    "PickupAbove", "PutNextLocalS6N4", "PutNextS7N4Carrying", "Unlock", "UnlockLocalDist",
    "KeyInBox", "UnlockPickupDist", "BlockedUnlockPickup", "UnlockToUnlock", "ActionObjDoor",
    "FindObjS7", "KeyCorridorS6R3", "OneRoomS20", "MoveTwoAcrossS8N9", "SynthS5R2",
    "SynthLoc", "SynthSeq", "MiniBossLevel", "BossLevel", "BossLevelNoUnlock",
)  # fmt: skip
"""AgentGym's 40 levels in order; each is `BabyAI-<name>-v0`."""

COMPLETED = "\n The task is completed."
CHECK_PREFIX = "You can take the following actions: "
NO_CHANGE = "No change in state."
NOT_RECOGNIZED = "The action is not recognized. Please check valid actions."

INSTRUCTION = """\
You are an agent in a grid world of rooms. Reach the goal stated in the first observation.
Each observation describes the objects you can see (with their distance in front of you and \
to your left or right), what is in front of you, what you carry, and ends with the list of \
actions available now. Objects are named by colour, type and a number, e.g. "red ball 1".
Actions (use one from the current list, written exactly as listed):
turn left, turn right, move forward
go to <object> <number> (walk until you face it)
pickup <object> <number>
drop (put down what you carry in front of you)
go through <door> <number> (an open door)
toggle and go through <door> <number> (a closed door, or a locked one if you carry a key of its colour)
toggle (open the door right in front of you)
go to goal
check available actions
Answer every observation in exactly this format:
Thought: <one short reason>
Action: <one action>"""


@cache
def _minigrid():
    """Import minigrid lazily (it is slow to import) and register AgentGym's GoToObjS6-v0."""
    import gymnasium
    import minigrid  # noqa: F401  (registers the BabyAI levels)

    if "BabyAI-GoToObjS6-v0" not in gymnasium.registry:
        gymnasium.register(
            id="BabyAI-GoToObjS6-v0", entry_point="minigrid.envs.babyai:GoToObj", kwargs={"room_size": 4}
        )
    return gymnasium


def make_level(level: str):
    """A fresh minigrid env (unwrapped) for one of `LEVELS`."""
    if level not in LEVELS:
        raise EnvError(f"babyai: unknown level {level!r}; choose one of: {', '.join(LEVELS)}")
    gymnasium = _minigrid()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "GoToObjS6-v0 is out of date": it is AgentGym's
        return gymnasium.make(f"BabyAI-{level}-v0", disable_env_checker=True).unwrapped


def level_and_seed(task_id: int) -> tuple[str, int]:
    return LEVELS[task_id % len(LEVELS)], task_id // len(LEVELS)


class BabyAIEnv(TextEnv):
    name = "babyai"
    instruction = INSTRUCTION
    max_turns = 20
    num_tasks = None

    def __init__(self) -> None:
        super().__init__()
        self.world = None
        """The minigrid env (unwrapped) of the current task."""

    def _reset(self, task_id: int) -> str:
        level, seed = level_and_seed(task_id)
        # A fresh minigrid env per episode, as AgentGym makes one: a reused env can sample a
        # different mission for the same seed (SynthLoc keeps state across resets).
        self.world = make_level(level)
        with contextlib.redirect_stdout(io.StringIO()):  # minigrid prints rejected layouts while sampling
            obs, _ = self.world.reset(seed=seed)
        self.goal = self.world.mission.replace("then", "and").replace("after you", "and")
        self._image = obs["image"]
        self.view = read_view(self.world, self._image)
        self._last_reward = 0.0
        self.score = 0.0
        return f"Your goal: {self.goal}\n{self.view.description}{action_list_text(self.view.actions)}"

    def _step(self, model_output: str) -> StepResult:
        action = parse_action_single_line(model_output)
        if action is None:
            return StepResult(ONLY_ONE_ACTION, 0.0, False, False, "")
        message, done = self._apply(action.lower().strip())
        self.score += self._last_reward
        # done only ever becomes true through an accomplished mission (see the module docstring)
        return StepResult(message + action_list_text(self.view.actions), self.score, done, done, action)

    def _apply(self, action: str) -> tuple[str, bool]:
        """The server side of a step: returns (text before the action list, done)."""
        actions = self.view.actions
        if "check" in action:
            return CHECK_PREFIX + ", ".join(actions), False
        if action == "":
            return NO_CHANGE, False
        if action not in actions:
            return self.view.errors.get(action, NOT_RECOGNIZED), False
        if not actions[action]:  # e.g. "go to" what the agent already faces
            return NO_CHANGE, False
        self._image, reward, terminated = run_primitives(self.world, actions[action], self._image)
        self.view = read_view(self.world, self._image)
        text = self.view.description + (COMPLETED if terminated else "")
        self._last_reward = reward
        done = terminated and reward > 0.5
        if reward == 1 and not done:
            done, text = True, text + COMPLETED
        return text, done

    def expert(self, task_id: int) -> list[str]:
        self.check_task_id(task_id)
        return BabyAIExpert().solve(task_id, self.max_turns)


def run_primitives(world, primitives: list[int], image) -> tuple[object, float, bool]:
    """Run a macro-action's primitives, stopping after the first that leaves the view unchanged.

    `image` is the view before the macro. Returns the last primitive's observed image,
    reward and terminated flag, which are what AgentGym reports for the whole macro.
    """
    reward, terminated = 0.0, False
    for primitive in primitives:
        obs, reward, terminated, _, _ = world.step(primitive)
        if (obs["image"] != image).sum() == 0:
            break
        image = obs["image"]
    return obs["image"], float(reward), bool(terminated)


# --- expert ------------------------------------------------------------------------------


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
            _, reward, terminated = run_primitives(sim, primitives, game._image)
            if terminated and reward > 0.5:
                return action, 0
            covered = along.get(_state_key(sim, door_states), 0)
            if covered > best_covered:
                best, best_covered = action, covered
        return best, best_covered
