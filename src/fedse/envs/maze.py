"""Maze: LMRL-Gym's double-T maze as AgentGym serves it (docs/environments.md).

One fixed 10x13 maze, goal at (8, 6); task id k starts at the k-th of 25 start cells
(AgentGym's id 25 is the goal cell itself and is rejected, as upstream's assertion does).
Coordinates are (row, column): "move down" adds 1 to the row, "move right" to the column.
Reward 1 and done on reaching the goal, 0 otherwise; walls and unknown actions leave
the position unchanged. Upstream's own 50-step cap ("Failure\\n", reward -1) is kept,
though AgentGym's 15-turn limit never reaches it.

Deviation: AgentGym sends the rules inside the first observation; fedse puts them in
`instruction` (the same place for every environment, so the prefix can be shared) and
the first observation is the server's reset observation alone.
"""

from __future__ import annotations

from collections import deque

from fedse.envs.base import StepResult, TextEnv, parse_action_lmrl

GRID = (
    "1111111111111",
    "1000001000001",
    "1110111110111",
    "1110111110111",
    "1110111110111",
    "1110000000111",
    "1111110111111",
    "1111110111111",
    "1111110111111",
    "1111111111111",
)
GOAL = (8, 6)
START_CELLS = (
    (1, 1), (1, 2), (1, 3), (1, 4), (1, 5), (1, 7), (1, 8), (1, 9), (1, 10), (1, 11),
    (2, 3), (3, 3), (4, 3), (5, 3), (5, 4), (5, 5), (5, 6), (6, 6), (7, 6),
    (5, 7), (5, 8), (5, 9), (4, 9), (3, 9), (2, 9),
)  # fmt: skip
MOVES = {"move up": (-1, 0), "move down": (1, 0), "move left": (0, -1), "move right": (0, 1)}
# Wall sentences list the neighbours in this order (upstream's describe_objects order).
_NEIGHBOURS = (((0, 1), "to your right"), ((0, -1), "to your left"), ((-1, 0), "above you"), ((1, 0), "below you"))
MAX_ENV_STEPS = 50

INSTRUCTION = """\
Find your way through a maze to the goal in as few moves as possible.
Each observation gives the goal position, your position and the walls next to you. \
Positions are "row, column": move down adds 1 to the row, move right adds 1 to the column. \
Moving into a wall leaves you in place.
Actions: move up, move down, move left, move right.
Example:
The goal is at position 8, 6. Your current position is at position 6, 6. There are walls to your right, to your left.
Thought: The goal is two rows below me and the way down is open.
Action: move down
Answer every observation in exactly this format:
Thought: <one short reason>
Action: <one action>"""


def is_open(cell: tuple[int, int]) -> bool:
    r, c = cell
    return 0 <= r < len(GRID) and 0 <= c < len(GRID[0]) and GRID[r][c] == "0"


def describe(cell: tuple[int, int]) -> str:
    walls = [rel for (dr, dc), rel in _NEIGHBOURS if not is_open((cell[0] + dr, cell[1] + dc))]
    if not walls:
        wall_text = "There are no walls near you."
    elif len(walls) == 1:
        wall_text = f"There is a wall {walls[0]}."
    else:
        wall_text = f"There are walls {', '.join(walls)}."
    return f"The goal is at position {GOAL[0]}, {GOAL[1]}. Your current position is at position {cell[0]}, {cell[1]}. {wall_text}"


def shortest_path(start: tuple[int, int]) -> list[str]:
    """BFS over open cells; returns the actions of one shortest path to GOAL."""
    parent: dict[tuple[int, int], tuple[tuple[int, int], str] | None] = {start: None}
    queue = deque([start])
    while queue:
        cell = queue.popleft()
        if cell == GOAL:
            break
        for action, (dr, dc) in MOVES.items():
            nxt = (cell[0] + dr, cell[1] + dc)
            if is_open(nxt) and nxt not in parent:
                parent[nxt] = (cell, action)
                queue.append(nxt)
    actions: list[str] = []
    cell = GOAL
    while parent[cell] is not None:
        cell, action = parent[cell]
        actions.append(action)
    return actions[::-1]


class MazeEnv(TextEnv):
    name = "maze"
    instruction = INSTRUCTION
    max_turns = 15
    num_tasks = len(START_CELLS)

    def start_task(self, task_id: int) -> str:
        self.position = START_CELLS[task_id]
        self.env_steps = 0
        return describe(self.position)

    def parse_action(self, model_output: str) -> str:
        return parse_action_lmrl(model_output)

    def act(self, action: str) -> StepResult:
        self.env_steps += 1
        if action in MOVES:
            dr, dc = MOVES[action]
            nxt = (self.position[0] + dr, self.position[1] + dc)
            if is_open(nxt):
                self.position = nxt
        if self.position == GOAL:
            return StepResult("Success\n", 1.0, True, True, action)
        if self.env_steps >= MAX_ENV_STEPS:
            return StepResult("Failure\n", -1.0, True, False, action)
        return StepResult(describe(self.position), 0.0, False, False, action)

    def expert(self, task_id: int) -> list[str]:
        cell = START_CELLS[self.check_task_id(task_id)]
        outputs = []
        for action in shortest_path(cell):
            thought = f"I am at {cell[0]}, {cell[1]} and the goal is at {GOAL[0]}, {GOAL[1]}; the shortest open path goes {action[5:]}."
            outputs.append(f"Thought: {thought}\nAction: {action}")
            dr, dc = MOVES[action]
            cell = (cell[0] + dr, cell[1] + dc)
        return outputs
