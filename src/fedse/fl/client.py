"""One client's round (Fed-SE Algorithm 1, lines 4-7): explore, filter, grow the buffer, train, report.

A round is `exploration_requests` played by `rollout` (the agent layer), then `learn`. The two
halves are apart so that a runtime may play several clients' episodes in one batch (the
embedded federation does) or one client's alone (a client process in a real federation).

Everything here runs on the client: the environment, the trajectories and the buffer never
leave it. What it returns for the server is an `Update` (adapter tensors, num_examples and
scalar metrics); the trained adapter itself stays with the client for personalized rules.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path

from pydantic import Field, field_validator

from fedse.agent.lora import Adapter, load_adapter, save_adapter
from fedse.agent.policy import Policy
from fedse.agent.rollout import RolloutRequest, Sampling
from fedse.agent.trajectory import Trajectory
from fedse.envs import has_expert, make_env
from fedse.evolve.agenttraj import AgentTrajError, item_id, read_agenttraj, seed_problem
from fedse.evolve.buffer import BufferSection, ExperienceBuffer
from fedse.evolve.experts import expert_trajectory
from fedse.evolve.filters import make_filter
from fedse.evolve.sft import TrainSection, input_moments, train_adapter
from fedse.files import write_folder
from fedse.fl.aggregators import Aggregator
from fedse.fl.privacy import PrivacySection, PrivateSeed, privatize_update
from fedse.fl.update import Update
from fedse.sections import Section
from fedse.seeds import derived_seed

log = logging.getLogger(__name__)


class ExploreSection(Section):
    """The `[explore]` section of a run configuration: how a client explores each round."""

    tasks: int | None = Field(32, ge=0)
    """Train tasks each client plays per round (None: its whole train split)."""
    temperature: float = Field(1.0, ge=0)
    """Sampling temperature of exploration."""
    max_new_tokens: int = Field(96, ge=1)
    """Tokens the model may write per turn."""
    max_batch: int = Field(32, ge=1)
    """Episodes played at once in one batched rollout (memory grows with it)."""
    first_round: int = Field(1, ge=1)
    """The first round that explores; earlier rounds train on the buffer (the expert seeds) only.
    1: round 1 explores with the fresh adapter, i.e. the raw base model (one reading of the paper);
    2: it explores first with the adapter federated-trained on the seeds (the other reading: the
    paper leaves open whether φ_0 is fresh or trained on D_expert)."""
    filter: str = "success"
    """success (the paper), none, or reward_threshold:<x> (`fedse.evolve.filters.make_filter`)."""

    @field_validator("filter")
    @classmethod
    def _known_filter(cls, v: str) -> str:
        make_filter(v)
        return v

    @property
    def sampling(self) -> Sampling:
        return Sampling(temperature=self.temperature, max_new_tokens=self.max_new_tokens)


def exploration_tasks(env_name: str, count: int | None, seed: int, part: int = 0, parts: int = 1) -> list[int]:
    """`count` train ids (None: all) of partition `part` of `parts` (every parts-th id, so the
    partitions are disjoint and cover the split), sampled without replacement while it lasts."""
    ids = list(make_env(env_name).splits["train"])[part::parts]
    count = len(ids) if count is None else count
    rng = random.Random(seed)
    out: list[int] = []
    while len(out) < count:
        rng.shuffle(ids)
        out += ids[: count - len(out)]
    return out


def exploration_requests(
    client: str,
    env_name: str,
    round_: int,
    explore: ExploreSection,
    seed: int = 0,
    adapter: str | None = None,
    part: int = 0,
    parts: int = 1,
) -> list[RolloutRequest]:
    """The episodes `client` plays in round `round_` on `env_name` (its partition `part` of
    `parts` of the train split), with adapter slot `adapter` (default: `client`) and
    per-episode seeds derived from (seed, round, client)."""
    adapter = adapter or client
    round_seed = derived_seed(seed, round_, client)
    tasks = exploration_tasks(env_name, explore.tasks, round_seed, part, parts)
    sampling = explore.sampling
    return [
        RolloutRequest(env_name, task, adapter=adapter, sampling=sampling, seed=derived_seed(round_seed, i))
        for i, task in enumerate(tasks)
    ]


def client_requests(
    client: str, envs: list[str], round_: int, explore: ExploreSection, seed: int = 0, part: int = 0, parts: int = 1
) -> list[RolloutRequest]:
    """Every episode `client` (holding `envs`, partition `part` of `parts`) plays in round `round_`,
    in adapter slot `client`. Draws are labelled by environment (a pooled client gets each
    environment's own) or, with several clients per environment, by client."""
    return [
        r
        for env in envs
        for r in exploration_requests(
            client if parts > 1 else env, env, round_, explore, seed, adapter=client, part=part, parts=parts
        )
    ]


def expert_seeds(
    client: str,
    envs: list[str],
    count: int | None,
    part: int = 0,
    parts: int = 1,
    seed_file: str | None = None,
) -> list[Trajectory]:
    """The demonstrations `client` starts its buffer with: `count` expert episodes on train tasks
    of each of its environments that has an expert (its partition), the same ones an environment's
    own client gets, pooled or not; then the successful records of `seed_file` (AgentTraj) on its
    environments, every parts-th of them for partition `part`."""
    experts = []
    for env in envs:
        if count != 0 and not has_expert(env):
            log.warning(
                "%s: environment %s has no expert; it is seeded from buffer.seed_file or exploration only", client, env
            )
            continue
        label = derived_seed("experts", env) if parts == 1 else derived_seed("experts", client)
        experts += [expert_trajectory(env, i) for i in exploration_tasks(env, count, label, part, parts)]
    if seed_file is not None:
        records = read_agenttraj(seed_file)
        for n, t in enumerate(records):
            if t.env in envs and (problem := seed_problem(t)) is not None:
                raise AgentTrajError(f"{seed_file} [{n}] ({item_id(t.env, t.task_id)}): {problem}")
        for env in envs:
            experts += [t for t in records if t.env == env and t.success][part::parts]
    return experts


def learn(
    policy: Policy,
    state: ClientState,
    explored: list[Trajectory],
    round_: int,
    explore: ExploreSection,
    train: TrainSection,
    aggregator: Aggregator,
    seed: int = 0,
    progress: str | None = None,
    privacy: PrivacySection | None = None,
) -> tuple[Update, Adapter]:
    """A client's round after its exploration, in either runtime (Algorithm 1, lines 4-6): filter
    the explored episodes, grow the client's buffer, train its adapter slot (named after it, holding
    the adapter it started the round from); keep the trained adapter in the client's folder when the
    rule is personalized. Returns the update for the server and the trained adapter. For a rule that
    reads inputs, the update also carries its summary of the layers' inputs on the training data."""
    client, buffer = state.client, state.buffer
    keep = make_filter(explore.filter)
    kept = [t for t in explored if keep.keep(t)]
    added = buffer.add(kept, round_)
    data = buffer.training_set(round_, warmup=round_ < explore.first_round)
    inputs, started = {}, time.perf_counter()
    if aggregator.reads_inputs:  # the layers' inputs on this round's training data, under the starting adapter
        inputs = aggregator.summarize_inputs(input_moments(policy, client, data, train.max_length))
    inputs_seconds = time.perf_counter() - started
    local_dp = privacy is not None and privacy.dp == "local"
    start = aggregator.upload(policy.get(client).tensors) if local_dp else {}  # what it received, as uploaded
    report = train_adapter(
        policy,
        client,
        data,
        train,
        seed=derived_seed(seed, round_, client),
        factors=aggregator.trains,
        progress=progress,
    )
    trained = policy.get(client)
    metrics = {
        "explored": len(explored),
        "explore_success": sum(t.success for t in explored) / max(len(explored), 1),
        "explore_tokens": sum(t.prompt_tokens + t.generated_tokens for t in explored),
        "kept": len(kept),
        "added": added,
        "buffer": len(buffer),
        "train_examples": len(data),
        "train_tokens": report.tokens,
        "train_seconds": report.seconds,
        "truncated": report.truncated,
    }
    if report.steps:
        metrics["train_loss"] = report.loss
    if inputs:
        metrics["inputs_seconds"] = inputs_seconds
    if aggregator.personalized:  # the client's own state: it never reaches the server
        state.keep(round_, trained)
    update = Update(client, aggregator.upload(trained.tensors), len(data), metrics, inputs)
    if local_dp:  # noised here, with a secret the server never sees
        update = privatize_update(update, start, privacy, PrivateSeed(state.root).generator(round_, client))
    return update, trained


class ClientState:
    """One client's private state, in one folder on the client's side of the boundary:

        <root>/buffer.jsonl           its experience buffer
        <root>/personal/round_NNN/    the adapter it kept after round NNN (personalized rules, PEFT format)

    The embedded runtime keeps it in the run folder's clients/<client>/, a Flower node in its own
    folder: one layout and one set of rules for both. The buffer is seeded once with the expert
    demonstrations (`seed`) and cut back to the last completed round when a round is played again
    (`rewind`); a personal adapter is written atomically (`keep`), and a round reads back the
    latest kept at or before it (`personal`)."""

    def __init__(
        self,
        root: str | Path,
        client: str,
        envs: list[str],
        buffer: BufferSection,
        part: int = 0,
        parts: int = 1,
        base_model: str | None = None,
    ) -> None:
        self.root, self.client, self.envs = Path(root), client, envs
        self.part, self.parts, self.section, self.base_model = part, parts, buffer, base_model
        self._buffer: ExperienceBuffer | None = None

    @property
    def buffer(self) -> ExperienceBuffer:
        """The buffer, read from disk once per process."""
        if self._buffer is None:
            self.root.mkdir(parents=True, exist_ok=True)
            self._buffer = ExperienceBuffer(self.buffer_file(self.root), self.section)
        return self._buffer

    def seeds(self) -> list[Trajectory]:
        """The demonstrations the client's buffer starts with (`expert_seeds`)."""
        section = self.section
        return expert_seeds(self.client, self.envs, section.expert_seeds, self.part, self.parts, section.seed_file)

    def seed(self, seeds: list[Trajectory] | None = None) -> None:
        """Start an empty buffer with the client's demonstrations (round 0), `seeds` if given."""
        if not self.buffer.stored:
            self.buffer.add(self.seeds() if seeds is None else seeds, 0)

    def rewind(self, last_round: int) -> None:
        """Forget what rounds after `last_round` added (an earlier attempt at the next round)."""
        self.buffer.truncate(last_round)

    @staticmethod
    def buffer_file(root: str | Path) -> Path:
        return Path(root) / "buffer.jsonl"

    @staticmethod
    def personal_folder(root: str | Path, round_: int) -> Path:
        return Path(root) / "personal" / f"round_{round_:03d}"

    def kept_rounds(self) -> list[int]:
        folders = (self.root / "personal").glob("round_[0-9][0-9][0-9]")
        return sorted(int(p.name[6:]) for p in folders if p.is_dir())

    def personal(self, round_: int) -> Adapter | None:
        """The adapter this client kept after round `round_`, or the latest before it (None: none)."""
        rounds = [r for r in self.kept_rounds() if r <= round_]
        return load_adapter(self.personal_folder(self.root, rounds[-1])) if rounds else None

    def keep(self, round_: int, adapter: Adapter) -> Path:
        """Write `adapter` as the one this client kept after round `round_`; returns its folder."""
        folder = self.personal_folder(self.root, round_)
        write_folder(folder, lambda tmp: save_adapter(adapter, tmp, base_model=self.base_model))
        return folder
