"""BabyAI: minigrid's grid-world missions played through AgentGym's text layer (docs/environments.md).

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
        self.image = None
        """The egocentric image of the observation minigrid last returned (what the text layer reads)."""
        self.view = None
        """The current `fedse.envs.babyai_text.View`: description, actions and their primitives."""

    def start_task(self, task_id: int) -> str:
        level, seed = level_and_seed(task_id)
        # A fresh minigrid env per episode, as AgentGym makes one: a reused env can sample a
        # different mission for the same seed (SynthLoc keeps state across resets).
        self.world = make_level(level)
        with contextlib.redirect_stdout(io.StringIO()):  # minigrid prints rejected layouts while sampling
            obs, _ = self.world.reset(seed=seed)
        self.goal = self.world.mission.replace("then", "and").replace("after you", "and")
        self.image = obs["image"]
        self.view = read_view(self.world, self.image)
        self._last_reward = 0.0
        self.score = 0.0
        return f"Your goal: {self.goal}\n{self.view.description}{action_list_text(self.view.actions)}"

    rejection = ONLY_ONE_ACTION

    @staticmethod
    def success_of(reward: float, done: bool) -> bool:
        return done  # done only through an accomplished mission; the score is never exactly 1

    @property
    def last_reward(self) -> float:
        """minigrid's reward of the last primitive run (the server's per-step `reward`)."""
        return self._last_reward

    def parse_action(self, model_output: str) -> str | None:
        return parse_action_single_line(model_output)

    def act(self, action: str) -> StepResult:
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
        self.image, reward, terminated = run_primitives(self.world, actions[action], self.image)
        self.view = read_view(self.world, self.image)
        text = self.view.description + (COMPLETED if terminated else "")
        self._last_reward = reward
        done = terminated and reward > 0.5
        if reward == 1 and not done:
            done, text = True, text + COMPLETED
        return text, done

    def expert(self, task_id: int) -> list[str]:
        from fedse.envs.babyai_expert import BabyAIExpert  # the expert plays BabyAIEnv games itself

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
