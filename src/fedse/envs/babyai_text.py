"""AgentGym's text layer over a minigrid BabyAI state (docs/environments.md).

`read_view(env, image)` turns the agent's 7x7 egocentric view into the description the agent
reads and the dictionary of actions it may take next, each action mapped to the
minigrid primitives it runs (a macro-action such as "go to red ball 1" is a BFS path). It
is three steps: `scan` reads the view, `describe` writes its text, `list_actions` plans the
actions.
Everything here reproduces AgentGym's wrapper (itself adapted from AgentBoard),
including its quirks, because the strings and paths are what a trained agent sees:

- objects are listed in view-scan order, stably sorted by Manhattan distance, and
  numbered per name ("grey key 1", "grey key 2"); pickup and go-to actions number only
  the objects a path reaches, so "pickup red ball 1" may be the second red ball listed;
- planning happens inside the visible window plus upstream's off-by-one margin, with
  walls, boxes, lava, balls and keys blocking and doors (even locked ones) passable;
- BFS parents are overwritten by later discoveries (upstream marks states visited when
  they leave the queue), so a planned path is not always a shortest one;
- "toggle and go through ... , as there is no path" prints the door-count dictionary.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

# minigrid's direction vectors: 0 right (+x), 1 down (+y), 2 left, 3 up.
DIR_TO_VEC = ((1, 0), (0, 1), (-1, 0), (0, -1))
TURN_LEFT, TURN_RIGHT, FORWARD, PICKUP, DROP, TOGGLE = range(6)

# minigrid's cell encoding (minigrid.core.constants), spelled out as AgentGym's wrapper does so
# that this module imports without minigrid.
IDX_TO_OBJECT = dict(
    enumerate(("unseen", "empty", "wall", "floor", "door", "key", "ball", "box", "goal", "lava", "agent"))
)
IDX_TO_COLOR = dict(enumerate(("red", "green", "blue", "purple", "yellow", "grey")))
_IDX_TO_STATE = {0: "open", 1: "closed", 2: "locked"}
_LISTED = ("door", "key", "ball", "box", "goal", "lava", "wall")
_BLOCKING = ("wall", "box", "lava", "ball", "key")
_NO_DROP = ("wall", "box", "lava", "ball", "key")
_BARRIERS = ("box", "wall")
_VIEW = 7

Pos = tuple[int, int]
Path = list[int]


@dataclass(frozen=True)
class Seen:
    name: str
    """'<color> <type>', or '<color> <state> door' for doors."""
    pos: Pos
    distance: int
    """Manhattan distance from the agent (a barrier's is the distance along the facing ray)."""


@dataclass(frozen=True)
class View:
    description: str
    actions: dict[str, Path]
    """Available actions in the order they are listed, each with its primitive actions."""
    errors: dict[str, str]
    """Specific error messages for actions that are named but not available now."""


def _dot(a: Pos, b: Pos) -> int:
    return a[0] * b[0] + a[1] * b[1]


def _window_ranges(top_left: Pos, f: Pos, r: Pos) -> tuple[range, range]:
    """Upstream's planning window: the view, plus one extra line on some sides."""
    border = (top_left[0] + _VIEW * (r[0] - f[0]), top_left[1] + _VIEW * (r[1] - f[1]))
    ranges = []
    for axis in (0, 1):
        if border[axis] < top_left[axis]:
            ranges.append(range(border[axis], top_left[axis] + 1))
        else:
            ranges.append(range(top_left[axis], border[axis]))
    return ranges[0], ranges[1]


def find_path(
    start: Pos, direction: int, target: Pos, blocked: set[Pos], xs: range, ys: range, *, onto: bool
) -> Path | None:
    """Primitive actions that end on `target` (onto) or facing it, as upstream's BFS finds them.

    Moves are tried in the order forward, left, right; a state counts as visited only
    once it leaves the queue, and a later discovery overwrites a state's parent.
    """
    parent: dict[tuple[Pos, int], tuple[tuple[Pos, int], int]] = {}
    visited: set[tuple[Pos, int]] = set()
    queue: deque[tuple[Pos, int]] = deque([(start, direction)])
    while queue:
        state = queue.popleft()
        visited.add(state)
        pos, d = state
        vec = DIR_TO_VEC[d]
        if pos == target if onto else (target[0] - pos[0], target[1] - pos[1]) == vec:
            path = []
            while state != (start, direction):
                state, action = parent[state]
                path.append(action)
            return path[::-1]
        for action in (FORWARD, TURN_LEFT, TURN_RIGHT):
            if action == FORWARD:
                nxt = ((pos[0] + vec[0], pos[1] + vec[1]), d)
            else:
                nxt = (pos, (d - 1) % 4 if action == TURN_LEFT else (d + 1) % 4)
            if nxt[0][0] not in xs or nxt[0][1] not in ys or nxt in visited or nxt[0] in blocked:
                continue
            queue.append(nxt)
            parent[nxt] = (state, action)
    return None


def _position_text(front: int, right: int) -> str:
    if right == 0:
        return f"right in front of you {front} steps away. "
    side = "right" if right > 0 else "left"
    return f"{front} steps in front of you and {abs(right)} steps to your {side}. "


@dataclass(frozen=True)
class Scan:
    """What the agent's 7x7 egocentric view holds, in upstream's scan order."""

    pos: Pos
    direction: int
    forward: Pos
    right: Pos
    top_left: Pos
    """The grid cell at the far left corner of the view."""
    seen: list[Seen]
    """Listed objects (walls included), stably sorted by Manhattan distance."""
    barriers: list[Seen]
    """Boxes and walls on the facing ray, nearest first."""
    carrying: object | None
    """minigrid's carried object (with .type and .color), or None."""

    def rel(self, cell: Pos) -> Pos:
        return (cell[0] - self.pos[0], cell[1] - self.pos[1])


def scan(env, image) -> Scan:
    """Read the view of a minigrid env (unwrapped) from `image`, the egocentric image of the
    observation minigrid last returned. It can be stale (levels that start the agent carrying
    an object remove it from the grid after rendering the first observation); AgentGym reads
    that image, so we do too."""
    pos = (int(env.agent_pos[0]), int(env.agent_pos[1]))
    d = int(env.agent_dir)
    f, r = DIR_TO_VEC[d], DIR_TO_VEC[(d + 1) % 4]
    top_left = (pos[0] + f[0] * (_VIEW - 1) - r[0] * (_VIEW // 2), pos[1] + f[1] * (_VIEW - 1) - r[1] * (_VIEW // 2))
    seen: list[Seen] = []
    barriers: list[Seen] = []
    for vj in range(_VIEW):
        for vi in range(_VIEW):
            cell = (top_left[0] - f[0] * vj + r[0] * vi, top_left[1] - f[1] * vj + r[1] * vi)
            distance = abs(pos[0] - cell[0]) + abs(pos[1] - cell[1])
            if cell[0] < 0 or cell[1] < 0 or distance == 0:
                continue
            kind = IDX_TO_OBJECT[int(image[vi, vj, 0])]
            color = IDX_TO_COLOR[int(image[vi, vj, 1])]
            if kind in _LISTED:
                name = f"{color} {_IDX_TO_STATE[int(image[vi, vj, 2])]} door" if kind == "door" else f"{color} {kind}"
                seen.append(Seen(name, cell, distance))
            rel = (cell[0] - pos[0], cell[1] - pos[1])
            if kind in _BARRIERS and f[0] * rel[1] - f[1] * rel[0] == 0:
                barriers.append(Seen(kind, cell, _dot(f, rel)))
    seen.sort(key=lambda s: s.distance)
    barriers.sort(key=lambda s: s.distance)
    return Scan(pos, d, f, r, top_left, seen, barriers, env.carrying)


def describe(view: Scan) -> str:
    """The text AgentGym's wrapper writes for a view: objects, walls, what is ahead, what is carried."""
    if view.seen:
        text = "In front of you in this room, you can see several objects: "
        counts: dict[str, int] = {}
        for obj in view.seen:
            if "wall" in obj.name:
                continue
            rel = view.rel(obj.pos)
            counts[obj.name] = counts.get(obj.name, 0) + 1
            text += f"There is a {obj.name} {counts[obj.name]} {_position_text(_dot(view.forward, rel), _dot(view.right, rel))} "
    else:
        text = "You cannot see any objects within sight."
    text += "The room has walls around you. "
    if view.barriers:
        text += f"You are facing a {view.barriers[0].name} {view.barriers[0].distance} steps away. "
    if view.carrying is not None:
        text += f"You are carrying a {view.carrying.color} {view.carrying.type}."
    else:
        text += "You are not carrying anything."
    return text


def list_actions(view: Scan) -> tuple[dict[str, Path], dict[str, str]]:
    """The actions available now, in upstream's order, each with its primitives; and the error
    messages of actions that are named but not available."""
    xs, ys = _window_ranges(view.top_left, view.forward, view.right)
    blocked = {s.pos for s in view.seen if any(k in s.name for k in _BLOCKING)}

    def path(target: Pos, onto: bool = False) -> Path | None:
        return find_path(view.pos, view.direction, target, blocked, xs, ys, onto=onto)

    actions: dict[str, Path] = {"turn left": [TURN_LEFT], "turn right": [TURN_RIGHT]}
    errors: dict[str, str] = {}
    if not view.barriers or view.barriers[0].distance > 1:
        actions["move forward"] = [FORWARD]
    else:
        errors["move forward"] = "There is a barrier in front of you, you can't move forward."
    _hands(actions, errors, view, path)
    _doors(actions, errors, view, path)
    for obj in view.seen:
        if "goal" in obj.name:
            route = path(obj.pos, onto=True)
            if route is not None:
                actions["go to goal"] = route
            else:
                errors["go to goal"] = "You cannot go to the goal, as there is no path leading to it."
    _numbered(actions, errors, "go to", view.seen, path, suffix=[], skip=("wall", "goal"))
    actions["check available actions"] = []
    return actions, errors


def read_view(env, image) -> View:
    """Describe what the agent of a minigrid env (unwrapped) sees and list its actions (see `scan`)."""
    view = scan(env, image)
    return View(describe(view), *list_actions(view))


def _hands(actions, errors, view: Scan, path) -> None:
    """Pickup (hands empty) and drop (something carried, free cell ahead)."""
    if view.carrying is None:
        _numbered(actions, errors, "pickup", view.seen, path, suffix=[PICKUP], skip=("wall", "door", "goal"))
        errors["drop"] = "You cannot drop the object, as you are not carrying anything."
        return
    ahead = (view.pos[0] + view.forward[0], view.pos[1] + view.forward[1])
    if any(s.pos == ahead and any(k in s.name for k in _NO_DROP) for s in view.seen):
        errors["drop"] = "You cannot drop the object, as there is already an object in front of you."
    else:
        actions["drop"] = [DROP]


def _doors(actions, errors, view: Scan, path) -> None:
    """Go through open doors, toggle and go through closed ones and locked ones with the right key."""
    carrying = view.carrying
    doors: dict[str, int] = {}
    for obj in view.seen:
        if "door" in obj.name:
            doors[obj.name] = doors.get(obj.name, 0) + 1
        label = f"{obj.name} {doors.get(obj.name, 0)}"
        if "open door" in obj.name:
            route = path(obj.pos, onto=True)
            if route is not None:
                actions[f"go through {label}"] = route
            else:
                errors[f"go through {label}"] = f"You cannot go through {label}, as there is no path leading to it."
        if "closed door" in obj.name:
            _toggle_through(actions, errors, obj, label, doors, path)
            errors[f"go through {label}"] = (
                f"You cannot go through {label}, as it is closed. You should toggle it first."
            )
        if "locked door" in obj.name:
            if carrying is None or carrying.type != "key":
                errors[f"toggle and go through {label}"] = (
                    f"You cannot toggle and go through {label}, as you are not carrying a key."
                )
            elif carrying.color != obj.name.split(" ")[0]:
                errors[f"toggle and go through {label}"] = (
                    f"You cannot toggle and go through {label}, "
                    "as the color of the key you are carrying does not match the color of door."
                )
            else:
                _toggle_through(actions, errors, obj, label, doors, path)


def _toggle_through(actions, errors, obj: Seen, label: str, doors: dict[str, int], path) -> None:
    route = path(obj.pos)
    key = f"toggle and go through {label}"
    if route is not None:
        actions[key] = [*route, TOGGLE, FORWARD]
    else:
        # upstream prints the whole per-name door count here, not the door's number
        errors[key] = f"You cannot toggle and go through {obj.name} {doors}, as there is no path leading to it."
    if route == []:
        actions["toggle"] = [TOGGLE]


def _numbered(actions, errors, verb: str, seen: list[Seen], path, *, suffix: Path, skip) -> None:
    """Pickup / go-to actions: numbered per name over the reachable objects only."""
    counts: dict[str, int] = {}
    for obj in seen:
        if any(k in obj.name for k in skip):
            continue
        route = path(obj.pos)
        if route is not None:
            counts[obj.name] = counts.get(obj.name, 0) + 1
            actions[f"{verb} {obj.name} {counts[obj.name]}"] = [*route, *suffix]
        else:
            label = f"{obj.name} {counts.get(obj.name, 0) + 1}"
            errors[f"{verb} {label}"] = f"You cannot {verb} {label}, as there is no path leading to it."


def action_list_text(actions: dict[str, Path]) -> str:
    """The '\\nAvailable actions: [...]' line the server appends to every observation."""
    return "\nAvailable actions: [" + ", ".join(f'"{a}"' for a in actions) + "]"
