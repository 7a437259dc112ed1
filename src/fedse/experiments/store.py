"""The run folder: its paths, its records, its checkpoints, and how a crashed run resumes.

    runs/<name>/
      config.json                the resolved configuration
      metrics.jsonl              one record per event (`fedse.experiments.records`)
      clients/<c>/buffer.jsonl   each client's experience buffer (private to the client)
      clients/<c>/personal/round_NNN/  its own adapter, personalised aggregators (private too)
      checkpoints/round_NNN/     the server's: global adapter (PEFT format), base delta (float32),
                                 aggregator state (its tensors apart, e.g. what the personal rule holds
                                 of each client), optimiser moments, the round's configuration
      state.json                 the last completed round, its global adapter's hash, and a digest
                                 of every file that round's state lives in (`RunStore.verify`)
      evals/                     re-evaluations of checkpoints (`fedse eval`)
      machine.jsonl              one line per sitting: the CPU, base dtype, torch and threads it ran on

A checkpoint is written into a temporary folder, fsynced and renamed, and only then is
state.json replaced: a crash at any point leaves the previous round complete. Every file is
written through `fedse.files` (atomic replaces, fsynced appends). Older checkpoints are pruned
(`[checkpoints]` keep_last / keep_every) only after state.json points at the new one.
"""

from __future__ import annotations

import fcntl
import json
import platform
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fedse.agent.dtype import cpu_model
from fedse.agent.lora import Adapter, load_adapter, save_adapter
from fedse.errors import UserError
from fedse.experiments.records import Record, RunRecords, parse_record
from fedse.files import (
    append_lines,
    atomic_write_json,
    drop_torn_tail,
    file_digest,
    make_dirs,
    read_lines,
    write_folder,
    write_lines,
)
from fedse.fl.client import ClientState
from fedse.fl.server import folded_tensors, tensors_folded

GLOBAL = "global"
DIGEST = re.compile(r"(\d+:)?[0-9a-f]+")
"""A digest state.json records: hex, after the byte count it covers for an appended file."""
LOCK = ".lock"
MARKER = ".fedse-run"
"""The file that marks a folder as a run fedse created (its run id): only such a folder is replaced by --force."""
MANIFEST = "digests.json"
"""In each checkpoint folder: the digest of every file that round's state lives in (`verify_checkpoint`)."""
RUN_ENTRIES = {
    MARKER,
    "config.json",
    "tensorboard",  # [log] tensorboard = true
    "dp_secret",  # [privacy] dp = "central": the server's noise seed, never sent
    "metrics.jsonl",
    "machine.jsonl",  # where each sitting of the run ran (`machine_record`)
    "state.json",
    "clients",
    "checkpoints",
    "evals",
    "report.md",
    LOCK,
    "flower.json",
    "nodes",  # a Flower run's token, and its simulated nodes' folders
}
"""What a run folder holds (plots aside); anything else means it is not only a run."""


class RunExists(FileExistsError):
    pass


@dataclass
class Checkpoint:
    """The server's state at the end of a round."""

    global_adapter: Adapter
    base_delta: dict[str, torch.Tensor] = field(default_factory=dict)
    """Cumulative dense ΔW per module, folded into the base (mutating aggregators)."""
    aggregator_state: dict = field(default_factory=dict)
    """The rule's own state: JSON values, and tensors (`held`) stored in their own file."""
    server_state: dict[str, torch.Tensor] = field(default_factory=dict)
    """The server optimiser's moments (fed.server_optimizer momentum / adam)."""
    folded: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] | None = field(default_factory=list)
    """Every round's folded delta as factors (`fedse.fl.server.ServerState.folded`)."""


def held(state: dict) -> dict[str, torch.Tensor]:
    """The tensors of an aggregator's state (`fedse.fl.aggregators.HELD`), stored apart from its JSON."""
    return {k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}


def machine_record(dtype: torch.dtype, resumed: bool) -> dict:
    """Where a sitting of a run executes: what decides its speed and its bits. A run finished over
    several sittings may have run on several machines, and a bf16 run on one CPU is not
    bit-comparable with an fp32 run on another."""
    return {
        "cpu": cpu_model(),
        "arch": platform.machine(),
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "resumed": resumed,
    }


class RunStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.sink: Callable[[tuple[Record, ...]], None] | None = None
        """Also receives every record appended (`fedse.experiments.tensorboard.TensorBoardLog`)."""

    # --- paths -------------------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.root / "config.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    def client(self, client: str) -> Path:
        """The client's own folder (`fedse.fl.client.ClientState`): its buffer and personal adapters."""
        return self.root / "clients" / client

    def buffer(self, client: str) -> Path:
        return ClientState.buffer_file(self.client(client))

    def buffers(self) -> list[Path]:
        """Every client buffer the run folder holds."""
        return sorted(p for c in (self.root / "clients").glob("*") if (p := ClientState.buffer_file(c)).exists())

    def checkpoint(self, round_: int) -> Path:
        return self.root / "checkpoints" / f"round_{round_:03d}"

    def personal(self, client: str, round_: int) -> Path:
        return ClientState.personal_folder(self.client(client), round_)

    def evaluation(self, round_: int, tasks: int | None) -> Path:
        return self.root / "evals" / f"round_{round_:03d}_tasks_{tasks or 'all'}.json"

    @property
    def flower(self) -> Path:
        """A Flower run's token (its nodes keep their folders under it)."""
        return self.root / "flower.json"

    @property
    def machine(self) -> Path:
        return self.root / "machine.jsonl"

    def record_sitting(self, record: dict) -> None:
        """Append one sitting's `machine_record` to machine.jsonl."""
        append_lines(self.machine, [json.dumps(record, sort_keys=True)])

    def sittings(self) -> list[dict]:
        """The machine records of the run's sittings, oldest first ([] for runs before they were kept)."""
        return [json.loads(line) for line in read_lines(self.machine)]

    # --- creating and reading ----------------------------------------------------------------

    def create(self, config: dict, force: bool = False) -> None:
        """A new, empty run folder holding `config`; an existing non-empty one only with `force`,
        and only if it is a fedse run holding nothing but what fedse writes (`foreign_entries`):
        --force never deletes a folder of someone else's files."""
        if self.root.is_symlink():
            raise RunExists(
                f"{self.root} is a symbolic link: a run folder must be a real folder; choose another run name"
            )
        present = [p for p in self.root.iterdir() if p.name != LOCK] if self.root.exists() else []
        if present:
            if not force:
                raise RunExists(f"{self.root} already exists; use --resume to continue it or --force to overwrite it")
            links = [p.name for p in present if p.is_symlink()]
            if links:
                raise RunExists(
                    f"{self.root} holds symbolic links ({', '.join(links[:5])}): --force never follows or removes "
                    "them; remove that folder yourself or choose another run name"
                )
            if not (self.root / MARKER).is_file():
                raise RunExists(
                    f"{self.root} is not a folder fedse created (it has no {MARKER}): --force only replaces runs "
                    "fedse made; choose another run name or move that folder away"
                )
            foreign = self.foreign_entries()
            if foreign:
                raise RunExists(
                    f"{self.root} is not a fedse run folder (it holds {', '.join(foreign[:5])}); "
                    "--force only replaces runs: choose another run name or move that folder away"
                )
            for path in present:  # the lock file stays: this process may be holding it
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        make_dirs(self.root)
        atomic_write_json(self.root / MARKER, {"run_id": uuid.uuid4().hex})
        atomic_write_json(self.config_path, config)

    def foreign_entries(self) -> list[str]:
        """What in the folder fedse does not write (all of it if there is no config.json)."""
        names = sorted(p.name for p in self.root.iterdir() if p.name != LOCK)
        if "config.json" not in names:
            return names
        return [n for n in names if n not in RUN_ENTRIES and not (n.endswith(".png") or n.endswith(".tmp"))]

    def write_config(self, config: dict) -> None:
        atomic_write_json(self.config_path, config)

    def checkpoint_config(self, round_: int) -> dict | None:
        """The configuration round `round_` completed under (None: a run from before it was kept)."""
        path = self.checkpoint(round_) / "config.json"
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise UserError(f"{path} cannot be read ({error}); restore it or resume from an earlier round") from None

    def read_config(self) -> dict:
        if not self.config_path.exists():
            raise UserError(f"{self.root} is not a run directory (no config.json); start one with `fedse run`")
        try:
            config = json.loads(self.config_path.read_text())
        except (OSError, ValueError) as error:
            raise UserError(f"{self.config_path} cannot be read ({error}); restore it") from None
        if not isinstance(config, dict):
            raise UserError(f"{self.config_path} is not a configuration (a JSON object); restore it")
        return config

    def append(self, *records: Record) -> None:
        append_lines(self.metrics, (r.to_json() for r in records))
        if self.sink is not None:
            self.sink(records)

    def records(self) -> list[Record]:
        out = []
        for number, line in enumerate(read_lines(self.metrics), start=1):
            record = parse_record(line, where=f"{self.metrics}:{number}")
            if record is not None:
                out.append(record)
        return out

    def load(self) -> RunRecords:
        """The configuration and every record of this run."""
        if not self.config_path.exists() or not self.metrics.exists():
            raise UserError(
                f"{self.root} is not a run directory (it needs config.json and metrics.jsonl; see `fedse run`)"
            )
        config = self.read_config()
        run = RunRecords(name=config.get("name", self.root.name), root=self.root, config=config)
        for record in self.records():
            run.add(record)
        return run

    # --- rounds and checkpoints --------------------------------------------------------------

    def read_state(self) -> dict | None:
        """state.json ({"round": int, "global_adapter": hash, "files": {...}, "buffers": {...}});
        None before round 0 completes."""
        if not self.state.exists():
            return None
        try:
            state = json.loads(self.state.read_text())
        except json.JSONDecodeError:
            state = None
        if not isinstance(state, dict) or type(state.get("round")) is not int or state["round"] < 0:
            raise UserError(
                f"{self.state} is corrupt (it needs a non-negative integer 'round'); "
                f"the checkpoints present are rounds {self.completed_rounds() or 'none'}"
            )
        for key in ("files", "buffers"):
            table = state.get(key, {})
            if not isinstance(table, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and DIGEST.fullmatch(v) for k, v in table.items()
            ):
                raise UserError(
                    f"{self.state} is corrupt: its '{key}' must map names to hex digests; "
                    f"restore it, or start the run again (checkpoints present: rounds {self.completed_rounds() or 'none'})"
                )
        return state

    def last_round(self) -> int | None:
        """The last completed round (None: none completed yet)."""
        state = self.read_state()
        return None if state is None else state["round"]

    def completed_rounds(self) -> list[int]:
        return sorted(int(p.name.split("_")[1]) for p in (self.root / "checkpoints").glob("round_[0-9][0-9][0-9]"))

    def save_checkpoint(
        self,
        round_: int,
        checkpoint: Checkpoint,
        base_model: str,
        config: dict | None = None,
        buffers: dict[str, str] | None = None,
        client_files: list[Path] | None = None,
    ) -> None:
        """Write the server's checkpoint of round `round_` atomically, then mark the round completed
        in state.json, with a digest of every file the round's state lives in (`verify`: the
        checkpoint's and `client_files`, the personal adapters the clients keep in their own
        folders) and the clients' buffer digests."""

        def server_files(tmp: Path) -> None:
            save_adapter(checkpoint.global_adapter, tmp / GLOBAL, base_model=base_model)
            if checkpoint.base_delta:
                tensors = {k: v.float().contiguous() for k, v in checkpoint.base_delta.items()}
                save_file(tensors, str(tmp / "base_delta.safetensors"))
            if checkpoint.server_state:
                save_file(
                    {k: v.contiguous() for k, v in checkpoint.server_state.items()},
                    str(tmp / "server_state.safetensors"),
                )
            if checkpoint.folded:
                save_file(folded_tensors(checkpoint.folded), str(tmp / "folded.safetensors"))
            state, tensors = checkpoint.aggregator_state, held(checkpoint.aggregator_state)
            (tmp / "aggregator.json").write_text(json.dumps({k: v for k, v in state.items() if k not in tensors}))
            if tensors:
                save_file(tensors, str(tmp / "aggregator.safetensors"))
            if config is not None:
                (tmp / "config.json").write_text(json.dumps(config, indent=2))

        write_folder(self.checkpoint(round_), server_files)
        files = [p for p in self.checkpoint(round_).rglob("*") if p.is_file()]
        files += list(client_files or [])
        digests = {str(p.relative_to(self.root)): file_digest(p) for p in sorted(files)}
        atomic_write_json(self.checkpoint(round_) / MANIFEST, digests)
        if self.metrics.exists():  # append-only: what later rounds add does not change this prefix
            size = self.metrics.stat().st_size
            digests["metrics.jsonl"] = f"{size}:{file_digest(self.metrics, size)}"
        state = {"round": round_, "global_adapter": checkpoint.global_adapter.hash, "files": digests}
        atomic_write_json(self.state, {**state, "buffers": buffers or {}})

    def verify_checkpoint(self, round_: int) -> None:
        """Check every file of round `round_`'s state (its checkpoint and the personal adapters it
        names) against the digests written with it: what `fedse eval` loads is what was saved. A
        UserError names the first file that is missing or differs, or a checkpoint without digests."""
        manifest = self.checkpoint(round_) / MANIFEST
        if not self.checkpoint(round_).is_dir():
            return  # no such round: `load_checkpoint` says which there are
        try:
            digests = json.loads(manifest.read_text())
        except (OSError, ValueError):
            raise UserError(
                f"{manifest} is missing or unreadable, so round {round_}'s checkpoint cannot be verified; "
                "evaluate a round whose checkpoint has it (rounds written by this fedse do)"
            ) from None
        if not isinstance(digests, dict) or not all(isinstance(v, str) for v in digests.values()):
            raise UserError(f"{manifest} is not a digest list; restore it")
        self._check_files(digests, round_, "evaluate another round")
        on_disk = {str(p.relative_to(self.root)) for p in self.checkpoint(round_).rglob("*") if p.is_file()}
        unlisted = sorted(on_disk - set(digests) - {str(manifest.relative_to(self.root))})
        if unlisted:
            raise UserError(f"{self.root / unlisted[0]} was not part of round {round_}'s checkpoint; remove it")

    def verify(self, round_: int) -> dict[str, str]:
        """Check every file state.json recorded for `round_` against its digest (the metrics file:
        its recorded prefix); returns the clients' recorded buffer digests. A UserError names the
        first file that is missing or differs: a run is never resumed from silently changed state."""
        state = self.read_state() or {}
        if state.get("round") != round_:
            return {}
        self._check_files(state.get("files", {}), round_, "start the run again")
        return state.get("buffers", {})

    def _check_files(self, digests: dict[str, str], round_: int, otherwise: str) -> None:
        """Each file against its recorded digest ("size:digest": its first `size` bytes, for an
        append-only file); a UserError names the first that is missing or differs."""
        for name, digest in digests.items():
            path = self.root / str(name)
            size, _, digest = digest.rpartition(":") if ":" in digest else ("", "", digest)
            try:
                ok = path.stat().st_size >= int(size or 0) and file_digest(path, int(size) if size else None) == digest
            except OSError:
                ok = False
            if not ok:
                raise UserError(
                    f"{path} is missing or differs from what round {round_}'s checkpoint recorded: it was changed "
                    f"or corrupted; restore it (or {otherwise})"
                )

    def prune_checkpoints(self, keep_last: int, keep_every: int) -> list[int]:
        """Delete the checkpoints (server and personal) of rounds neither among the last
        `keep_last` completed (0: all are kept) nor a multiple of `keep_every`; returns them.
        The round state.json names is always kept."""
        if keep_last == 0:
            return []
        rounds = self.completed_rounds()
        last = self.last_round()
        keep = set(rounds[-keep_last:]) | {last}
        if keep_every:
            keep |= {r for r in rounds if r % keep_every == 0}
        dropped = [r for r in rounds if r not in keep]
        for r in dropped:
            shutil.rmtree(self.checkpoint(r))
            for client in (self.root / "clients").glob("*"):
                shutil.rmtree(ClientState.personal_folder(client, r), ignore_errors=True)
        return dropped

    def load_checkpoint(self, round_: int) -> Checkpoint:
        ckpt = self.checkpoint(round_)
        if not ckpt.exists():
            raise UserError(
                f"{self.root} has no checkpoint for round {round_}; completed rounds: {self.completed_rounds() or 'none'}"
            )
        delta_file, server_file = ckpt / "base_delta.safetensors", ckpt / "server_state.safetensors"
        folded_file, held_file = ckpt / "folded.safetensors", ckpt / "aggregator.safetensors"
        try:
            base_delta = load_file(str(delta_file)) if delta_file.exists() else {}
            # no file: nothing folded yet, or a rule (or an older fedse) that kept the total only densely
            folded = None if base_delta else []
            if folded_file.exists():
                folded = tensors_folded(load_file(str(folded_file)))
            checkpoint = Checkpoint(
                global_adapter=load_adapter(ckpt / GLOBAL),
                base_delta=base_delta,
                aggregator_state={
                    **json.loads((ckpt / "aggregator.json").read_text()),
                    **(load_file(str(held_file)) if held_file.exists() else {}),
                },
                server_state=load_file(str(server_file)) if server_file.exists() else {},
                folded=folded,
            )
        except (OSError, ValueError, SafetensorError) as error:
            raise UserError(
                f"the checkpoint {ckpt} cannot be read ({error}); restore it or use an earlier round"
            ) from None
        state = self.read_state()
        if (
            state is not None
            and state["round"] == round_
            and state.get("global_adapter") != checkpoint.global_adapter.hash
        ):
            raise UserError(
                f"the global adapter in {ckpt} does not match the hash state.json recorded for round {round_} "
                f"({checkpoint.global_adapter.hash} vs {state.get('global_adapter')}): it was changed or corrupted"
            )
        return checkpoint

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run's lock (`.lock`, an exclusive flock) for the duration: a second process
        running or resuming the same run gets a clear error instead of doubling its records."""
        make_dirs(self.root)
        with (self.root / LOCK).open("a") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UserError(f"{self.root} is in use by another fedse process; wait for it or stop it") from None
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def trim_records(self, last_round: int) -> None:
        """Drop the records of rounds after `last_round` (an unfinished round), atomically, and
        a line torn by the crash."""
        if not self.metrics.exists():
            return
        drop_torn_tail(self.metrics)
        lines = read_lines(self.metrics)
        kept = []
        for number, line in enumerate(lines, start=1):
            record = parse_record(line, where=f"{self.metrics}:{number}")  # a clear error if corrupt
            round_ = record.round if record is not None else json.loads(line).get("round", 0)
            if round_ <= last_round:
                kept.append(line)
        if len(kept) != len(lines):
            write_lines(self.metrics, kept)


class ExperimentStore:
    """An experiment's folder, `results/<experiment>/<method>/seed<k>/`: one run folder per cell,
    and the one definition of a finished cell."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def cell(self, method: str, seed: int) -> Path:
        return self.root / method / f"seed{seed}"

    def status(self, method: str, seed: int) -> str:
        """'done': the run completed every round of the configuration it was made with (an
        interrupted run's last evaluation is an earlier round's and would drag its method down);
        'partial': it completed some and can resume; 'absent': none."""
        store = RunStore(self.cell(method, seed))
        last = store.last_round() if store.root.exists() else None
        if last is None:
            return "absent"
        done = store.config_path.exists() and last >= store.read_config()["fed"]["rounds"]
        return "done" if done else "partial"
