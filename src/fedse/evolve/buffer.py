"""A client's experience buffer (Fed-SE §2.1): expert seeds plus every round's kept trajectories.

D_train^{k,0} = expert demonstrations; D_train^{k,t} = D_train^{k,t-1} ∪ D_succ^{k,t}, without a
capacity limit by default (the paper). Options: `cap` keeps only the newest N entries;
`dedup="exact"` skips a trajectory whose env, task and agent turns are already in the buffer;
`history=False` trains on the current round's additions only (the "w/o history" ablation); in a
warm-up round, before anyone explores, the seeds are what that round brings, so it trains on them.

On disk: one JSON line per entry, `{"round": t, "trajectory": {...}}`, seeds at round 0. The file
is appended to and fsynced; rewrites (cap, truncation) replace it atomically (`fedse.files`),
so a crash leaves either the old or the new buffer, never half of one.

Everything the buffer holds is a function of the file's lines: the cap's eviction and the dedup
keys are recomputed from them, so a resumed process agrees with the one that crashed. Entries
the cap evicts during round t stay on disk until round t+1 adds (when round t is complete and
can no longer be rolled back), so a resume from round t-1 still finds them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import Field

from fedse.agent.trajectory import Trajectory
from fedse.errors import UserError
from fedse.files import append_lines, drop_torn_tail, read_lines, write_lines
from fedse.sections import Section


class BufferSection(Section):
    """The `[buffer]` section of a run configuration."""

    expert_seeds: int | None = Field(None, ge=0)
    """Expert demonstrations that seed each buffer (None: one per train id, like AgentTraj)."""
    seed_file: str | None = None
    """An AgentTraj file (`fedse.evolve.agenttraj`) whose successful records also seed the buffers,
    each client taking its environments' records; set expert_seeds = 0 to seed from it alone."""
    cap: int | None = Field(None, ge=1)
    """Keep only the newest N entries (None: unbounded, the paper)."""
    dedup: Literal["none", "exact"] = "none"
    """exact: skip a trajectory whose environment, task and agent turns the buffer already holds."""
    history: bool = True
    """False: train on the current round's additions only (the "w/o history" ablation)."""


def _key(t: Trajectory) -> tuple:
    return (t.env, t.task_id, tuple(t.outputs))


class ExperienceBuffer:
    def __init__(self, path: str | Path, config: BufferSection | None = None) -> None:
        self.path = Path(path)
        self.config = config or BufferSection()
        self.entries: list[tuple[int, Trajectory]] = []
        self._lines: dict[tuple[int, int], tuple[Trajectory, str]] = {}
        for number, line in enumerate(read_lines(self.path), start=1):
            try:
                record = json.loads(line)
                self.entries.append((int(record["round"]), Trajectory(**record["trajectory"])))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
                raise UserError(
                    f"{self.path}:{number}: not a buffer entry ({type(error).__name__}: {error}); "
                    "fix or remove that line (entries are one JSON object per line)"
                ) from None
        self.stored = self.entries
        """Every line on disk, evicted-but-not-yet-dropped entries included."""
        self.entries = self._window(self.stored)

    def _window(self, stored: list[tuple[int, Trajectory]]) -> list[tuple[int, Trajectory]]:
        cap = self.config.cap
        return stored[-cap:] if cap is not None and len(stored) > cap else list(stored)

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, trajectories: list[Trajectory], round_: int) -> int:
        """Add kept trajectories from `round_` (0 = seeds); returns how many were added."""
        older = [(r, t) for r, t in self.stored if r < round_]  # complete rounds: drop what they evicted
        if len(self._window(older)) < len(older):
            self.stored = self._window(older) + [(r, t) for r, t in self.stored if r >= round_]
            self._rewrite()
        keys = {_key(t) for _, t in self.entries}
        new = []
        for t in trajectories:
            if self.config.dedup == "exact" and _key(t) in keys:
                continue
            keys.add(_key(t))
            new.append((round_, t))
        if new:
            append_lines(self.path, (self._line(r, t) for r, t in new))
        self.stored = self.stored + new
        self.entries = self._window(self.stored)
        return len(new)

    def training_set(self, round_: int, warmup: bool = False) -> list[Trajectory]:
        """Everything (history) or only what round `round_` added; a `warmup` round (one that
        does not explore) adds nothing itself, so without history it trains on the seeds."""
        if self.config.history:
            return [t for _, t in self.entries]
        fresh = 0 if warmup else round_
        return [t for r, t in self.entries if r == fresh]

    def truncate(self, last_round: int) -> None:
        """Forget entries from rounds after `last_round` (resuming after a crash mid-round),
        and a line torn by the crash."""
        drop_torn_tail(self.path)
        if any(r > last_round for r, _ in self.stored):
            self.stored = [(r, t) for r, t in self.stored if r <= last_round]
            self.entries = self._window(self.stored)
            self._rewrite()

    def digest(self) -> str:
        """SHA-256 of what the buffer holds (its window, as lines): equal in a running process
        and in one that reopened the file, whatever compaction happened in between."""
        h = hashlib.sha256()
        for r, t in self.entries:
            h.update((self._line(r, t) + "\n").encode("utf-8"))
        return h.hexdigest()

    def counts(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for r, _ in self.entries:
            out[r] = out.get(r, 0) + 1
        return out

    def _line(self, round_: int, t: Trajectory) -> str:
        """An entry's line, computed once per entry and process (a large seed file's digest at
        every checkpoint would otherwise serialise every trajectory again)."""
        key = (round_, id(t))
        cached = self._lines.get(key)
        if cached is None or cached[0] is not t:  # the cache holds `t`, so its id is not reused meanwhile
            cached = self._lines[key] = (t, json.dumps({"round": round_, "trajectory": t.record()}, ensure_ascii=False))
        return cached[1]

    def _rewrite(self) -> None:
        kept = {(r, id(t)) for r, t in self.stored}
        self._lines = {k: v for k, v in self._lines.items() if k in kept}
        write_lines(self.path, (self._line(r, t) for r, t in self.stored))
