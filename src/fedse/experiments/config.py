"""Run configuration: TOML files validated into typed objects, with defaults in one place.

    config = load_config("configs/demo.toml", overrides=["fed.rounds=3", "fed.aggregator=ffa"])

Unknown keys and bad values are one-line errors naming the key and what is allowed.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from fedse.agent.lora import LoraSpec
from fedse.agent.model import KNOWN_MODELS, model_available
from fedse.envs import (
    BUILT_IN_ENVS,
    EnvBackend,
    EnvError,
    defined_on_its_node,
    has_expert,
    list_envs,
    register_env,
    register_node_env,
    register_served_env,
)
from fedse.errors import UserError
from fedse.evolve.buffer import BufferSection
from fedse.evolve.sft import TrainSection
from fedse.experiments.tensorboard import LogSection
from fedse.fl.aggregators import AGGREGATORS, Aggregator, make_aggregator
from fedse.fl.client import ExploreSection
from fedse.fl.privacy import PrivacySection, dp_refusal, secagg_refusal
from fedse.fl.update import DEFAULT_MAX_UPDATE_NORM
from fedse.sections import Section


class ModelSection(Section):
    """The `[model]` section: the frozen base model and the LoRA adapter every client trains."""

    name: str = "smollm2-135m"
    """The base model: "smollm2-135m" (the embedded one), "tiny-random" (tests), a local model
    folder, or a hub id already in the local cache (nothing is downloaded)."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """auto: bf16 on CUDA and on CPUs measured to run it faster (fedse.agent.dtype; `fedse info` says which),
    else fp32; fp32 always for aggregators that merge updates into the base weights (a bf16 base would
    round them away)."""
    lora_rank: int = Field(8, ge=1)
    """The adapter's rank r."""
    lora_alpha: int = Field(16, ge=1)
    """LoRA's alpha: the update is (alpha / r) · B A."""
    target_modules: str | list[str] = "all-linear"
    """"all-linear" (Fed-SE) or a list of linear-layer names, e.g. ["q_proj", "v_proj"]; names the
    model lacks are refused when it loads (`fedse.agent.lora.check_target_modules`)."""

    @field_validator("name")
    @classmethod
    def _loadable_model(cls, v: str) -> str:
        if not model_available(v):
            raise ValueError(
                f"{v!r} is not a model fedse can load offline: use {', '.join(KNOWN_MODELS)}, "
                "a local model folder (with config.json), or a hub id already in the local cache"
            )
        return v

    @field_validator("target_modules")
    @classmethod
    def _target_names(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, str) and v != "all-linear":
            raise ValueError('use "all-linear" or a list of layer names such as ["q_proj", "v_proj"]')
        if isinstance(v, list) and (not v or not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", n) for n in v)):
            raise ValueError(
                "each target module is a layer name of letters, digits, '_' and '.', and the list is not empty"
            )
        return v


class FedSection(Section):
    """The `[fed]` section: who federates, for how long, and how the server aggregates."""

    clients: list[str] = Field(default_factory=lambda: ["maze", "wordle", "textcraft"])
    """One client per environment (Fed-SE's setup)."""
    rounds: int = Field(20, ge=0)
    """0: evaluate the starting adapter only (the pretrained baseline)."""
    aggregator: str = "fedse"
    """The aggregation rule (`fedse.fl.aggregators`; the aggregators page lists them)."""
    clients_per_round: float = Field(1.0, gt=0)
    """A fraction (<= 1) or a count (> 1) of clients sampled each round; 1.0 = all."""
    clients_per_env: int = Field(1, ge=1)
    """Clients per environment, named <env>-<i>, each holding every clients_per_env-th train id
    (disjoint partitions): many sites of one kind. 1: one client per environment, named <env>."""
    centralized: bool = False
    """One client, "central", holding every environment above with their pooled data: the
    privacy-free Centralized baseline (static with explore.tasks = 0, online otherwise)."""
    server_lr: float = Field(1.0, gt=0)
    """The server step: global ← global + server_lr · (aggregate − global) (`fedse.fl.server.server_step`).
    1.0 is the paper's plain aggregate (and measured best in the demo's setting: see server_step).
    Not for flora/fedex (they fold updates into the base)."""
    server_optimizer: Literal["sgd", "momentum", "adam"] = "sgd"
    """The server's step on the mean update (`fedse.fl.server.ServerOptimizer`): sgd with server_lr
    (1: the paper), momentum (FedAvgM) or adam (FedAdam), both with server_lr as their step size."""
    server_momentum: float = Field(0.9, ge=0, lt=1)
    """momentum and adam: the first-moment decay (FedAvgM's β, FedAdam's β1)."""
    server_beta2: float = Field(0.99, ge=0, lt=1)
    """adam: the second-moment decay."""
    server_eps: float = Field(1e-3, gt=0)
    """adam: the adaptivity floor (FedAdam's τ)."""
    max_update_norm: float = Field(DEFAULT_MAX_UPDATE_NORM, gt=0)
    """Bound on ‖a client's uploaded factors − the global ones‖_F (`fedse.fl.update.bound_update`)."""
    update_bound: Literal["clip", "reject", "off"] = "clip"
    """What the server does with an update above max_update_norm: scale it back onto the bound,
    drop it, or nothing."""
    trim: float = Field(0.2, ge=0, lt=0.5)
    """The trimmed aggregator's fraction dropped at each end per entry."""
    merge_scale: float = Field(1.0, gt=0)
    """The sum aggregator's λ: W += λ Σ_k ΔW_k (1: every update at full strength; 1/K: the mean);
    the personal aggregator's λ: the shared base is W_0 + λ · mean_k s B_k A_k."""
    merge_rank: int = Field(0, ge=0)
    """The subspace and regmean aggregators' rank budget for the merged update: 0 keeps it exact
    (Σ_k r_k); a smaller rank truncates it, recording the energy dropped each round."""
    merge_elect: bool = True
    """The subspace aggregator's sign election on shared directions (false: plain average there)."""
    input_rank: int = Field(64, ge=1)
    """The regmean aggregator: how many principal directions of each layer's input second moment a
    client sends (with the rest's diagonal)."""
    input_alpha: float = Field(0.9, ge=0, le=1)
    """The regmean aggregator's shrinkage: G̃ = α G + (1 − α) diag(G) (RegMean's α)."""
    seed: int = 0
    """Seeds everything random in the run: adapter init, task sampling, exploration, batching, and
    the fresh adapter the folding rules (flora, sum, subspace, regmean) restart from each round."""

    def build_aggregator(self) -> Aggregator:
        """The configured aggregation rule, given the options it takes."""
        return make_aggregator(
            self.aggregator,
            trim=self.trim,
            scale=self.merge_scale,
            rank=self.merge_rank,
            elect=self.merge_elect,
            input_rank=self.input_rank,
            alpha=self.input_alpha,
            seed=self.seed,
        )

    @model_validator(mode="after")
    def _clients_fit(self) -> FedSection:
        if self.clients_per_env > 1 and (self.centralized or AGGREGATORS[self.aggregator].personalized):
            raise ValueError(
                "clients_per_env > 1 needs one shared adapter: not with centralized, nor with a personalized "
                "aggregator (each environment would have several adapters to evaluate)"
            )
        if len(set(self.clients)) != len(self.clients):
            raise ValueError("each environment once in clients (clients_per_env makes several clients of one)")
        return self

    @model_validator(mode="after")
    def _server_lr_fits(self) -> FedSection:
        if (self.server_lr != 1.0 or self.server_optimizer != "sgd") and AGGREGATORS[self.aggregator].mutates_base:
            raise ValueError(
                f"server_lr must be 1.0 and server_optimizer sgd with {self.aggregator} (it folds updates into the base model)"
            )
        return self

    @field_validator("aggregator")
    @classmethod
    def _known_aggregator(cls, v: str) -> str:
        if v not in AGGREGATORS:
            raise ValueError(f"must be one of: {', '.join(AGGREGATORS)}")
        return v

    @field_validator("clients")
    @classmethod
    def _known_envs(cls, v: list[str]) -> list[str]:
        unknown = [e for e in v if e not in list_envs()]
        if unknown or not v:
            raise ValueError(f"each client is an environment, one of: {', '.join(list_envs())}")
        return v


class EvalSection(Section):
    """The `[eval]` section: greedy episodes on each environment's test split."""

    tasks: int | None = Field(None, ge=1)
    """Test tasks per environment, spread evenly over the AgentEval test split (None: all of it)."""
    max_new_tokens: int = Field(96, ge=1)
    """Tokens the model may write per turn."""
    max_batch: int | None = Field(None, ge=1)
    """Test episodes played at once (None: explore.max_batch, the same memory budget)."""
    every: int = Field(1, ge=1)
    """Evaluate after every N-th round; round 0 (unless `first` is false) and the last round always."""
    first: bool = True
    """Evaluate round 0, the starting adapter. An experiment whose pretrained cell evaluates it
    once for every method sets it false for the others (it is the same model in all of them)."""


class CheckpointSection(Section):
    """Which round checkpoints stay on disk (the last completed one always does)."""

    keep_last: int = Field(0, ge=0)
    """Keep the last N rounds' checkpoints (0: keep every round)."""
    keep_every: int = Field(0, ge=0)
    """Also keep every K-th round's (0: none beyond keep_last); round 0 counts as a multiple."""


class ConfigError(UserError):
    """A one-line description of what is wrong in a configuration."""


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
RUN_NAME_RULE = (
    "must be a plain folder name: letters, digits, '.', '_' or '-', starting with a letter or digit, "
    "at most 100 characters (use --runs-dir to put runs elsewhere)"
)


def is_run_name(name: str) -> bool:
    """A run name is a plain folder name under the runs folder: never a path, never '.' or '..'."""
    return bool(RUN_NAME.fullmatch(name)) and not name.endswith(".")


def check_run_name(name: str) -> str:
    if not is_run_name(name):
        raise ConfigError(f"run name {name!r} {RUN_NAME_RULE}")
    return name


CENTRAL = "central"
"""The one client of a centralized run (`fed.centralized`): every environment, pooled data."""


class RunConfig(Section):
    """A whole run. Each section is owned by the layer that consumes it, with its defaults there:
    [explore] by `fedse.fl.client`, [buffer] by `fedse.evolve.buffer`, [train] by `fedse.evolve.sft`."""

    name: str = "run"
    """The run's folder name under the runs folder (`check_run_name`)."""
    model: ModelSection = ModelSection()
    fed: FedSection = FedSection()
    explore: ExploreSection = ExploreSection()
    buffer: BufferSection = BufferSection()
    train: TrainSection = TrainSection()
    eval: EvalSection = EvalSection()
    checkpoints: CheckpointSection = CheckpointSection()
    log: LogSection = LogSection()
    privacy: PrivacySection = PrivacySection()
    env: dict[str, EnvBackend] = Field(default_factory=dict)
    """Per environment, where its games run: `[env.maze] backend = "http"`, `url = "http://host:port"`
    (an AgentGym server or `fedse serve-env`); environments not listed run in process. A Flower
    node's own configuration may replace the tables of the environments it holds
    (`fedse.flower.node.NodeEnvs`)."""

    def base_dtype(self) -> str:
        """The base model's dtype: the configured one; "auto" is float32 under a rule that folds
        deltas into the base (a bf16 base would round them away)."""
        dtype = self.model.dtype
        return "float32" if dtype == "auto" and AGGREGATORS[self.fed.aggregator].mutates_base else dtype

    def eval_batch(self) -> int:
        """How many test episodes an evaluation plays at once (`eval.max_batch`)."""
        return self.eval.max_batch or self.explore.max_batch

    def lora_spec(self) -> LoraSpec:
        targets = self.model.target_modules
        return LoraSpec(
            self.model.lora_rank,
            self.model.lora_alpha,
            target_modules=targets if isinstance(targets, str) else tuple(targets),
        )

    def client_layout(self) -> tuple[dict[str, list[str]], dict[str, tuple[int, int]]]:
        """The run's clients: client -> the environments it holds (one each as in Fed-SE, all in
        one when centralized, or `<env>-<i>` for several per environment), and client -> (its
        partition, how many) of its environment's train split."""
        envs, parts = list(self.fed.clients), self.fed.clients_per_env
        if self.fed.centralized:
            client_envs = {CENTRAL: envs}
        elif parts == 1:
            client_envs = {env: [env] for env in envs}
        else:
            client_envs = {f"{env}-{i}": [env] for env in envs for i in range(parts)}
        partition = {c: (int(c.rsplit("-", 1)[1]), parts) if parts > 1 else (0, 1) for c in client_envs}
        return client_envs, partition

    @model_validator(mode="after")
    def _privacy_fits_the_rule(self) -> RunConfig:
        refusal = dp_refusal(AGGREGATORS[self.fed.aggregator], self.privacy.dp)
        if refusal:
            raise ValueError(
                f"privacy.dp = '{self.privacy.dp}' with fed.aggregator = '{self.fed.aggregator}': {refusal} "
                "(the Aggregators page lists what each rule supports)"
            )
        refusal = self.privacy.secagg and secagg_refusal(AGGREGATORS[self.fed.aggregator], self.privacy.dp)
        if refusal:
            raise ValueError(
                f"privacy.secagg = true with fed.aggregator = '{self.fed.aggregator}'"
                f"{'' if self.privacy.dp == 'off' else f' and privacy.dp = {self.privacy.dp!r}'}: {refusal} "
                "(the Aggregators page lists what each rule supports)"
            )
        return self

    @model_validator(mode="after")
    def _evaluates_something(self) -> RunConfig:
        if self.fed.rounds == 0 and not self.eval.first:
            raise ValueError("fed.rounds = 0 with eval.first = false evaluates nothing: set eval.first = true")
        return self

    @model_validator(mode="before")
    @classmethod
    def _register_own_envs(cls, data: object) -> object:
        """Environments of your own (named by class, a game on its server only, or one its Flower
        node defines) are registered before anything names them (fed.clients): `fedse.envs`."""
        tables = data.get("env") if isinstance(data, dict) else None
        for name, table in (tables or {}).items():
            if not isinstance(table, dict):
                continue
            path = table.get("class") or table.get("class_")
            try:
                if isinstance(path, str):
                    register_env(name, path, table.get("options") or {})
                elif table.get("backend") == "http" and name not in BUILT_IN_ENVS:  # a game on its server only
                    register_served_env(name, EnvBackend.model_validate(table))
                elif table.get("backend") == "node":  # defined by the Flower node holding it
                    register_node_env(name)
            except EnvError as error:
                raise ValueError(f"[env.{name}]: {error}") from None
            except ValidationError:  # the table's own mistake: reported by key when `env` is validated
                continue
        return data

    @field_validator("env")
    @classmethod
    def _known_env_backends(cls, v: dict[str, EnvBackend]) -> dict[str, EnvBackend]:
        unknown = sorted(set(v) - set(list_envs()))
        if unknown:
            raise ValueError(f"[env.{unknown[0]}]: not an environment; one of: {', '.join(list_envs())}")
        return v

    @model_validator(mode="after")
    def _every_client_has_data(self) -> RunConfig:
        """An environment without an expert takes no expert seeds; its client needs a seed file
        or exploration, or it would never train."""
        if self.buffer.seed_file is not None or self.explore.tasks != 0:
            return self
        for env in self.fed.clients:
            if not defined_on_its_node(env) and not has_expert(env):  # a node checks its own
                raise ValueError(
                    f"environment {env!r} has no expert, and with no buffer.seed_file and explore.tasks = 0 its "
                    "client would never train: seed it from an AgentTraj file (buffer.seed_file) or let it explore"
                )
        return self

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if not is_run_name(v):
            raise ValueError(RUN_NAME_RULE)
        return v


CHANGEABLE_ON_RESUME = ("fed.rounds", "eval.", "explore.max_batch", "checkpoints.", "env.", "log.")
"""What a resumed run may change (with `fedse run --resume … --change-config`): how long it runs,
how it is evaluated and kept, how wide it batches, where its environments' servers are. Everything else shapes the rounds already
done (a rank, a client, a seed, a learning rate), so it needs a new run."""


CHANGEABLE_SAID = ", ".join(k + "*" if k.endswith(".") else k for k in CHANGEABLE_ON_RESUME)
"""The same, as messages say it: "fed.rounds, eval.*, …"."""


def flat_items(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_items(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(old: RunConfig, new: RunConfig) -> list[str]:
    """The dotted keys whose values differ between two configurations (the run name aside)."""
    a, b = flat_items(old.model_dump()), flat_items(new.model_dump())
    return sorted(k for k in a.keys() | b.keys() if k != "name" and a.get(k) != b.get(k))


def check_resume_changes(old: RunConfig, new: RunConfig, allowed: bool, where: str) -> list[str]:
    """The changes `new` makes to a run that started as `old`; a ConfigError if there are any
    and they are not `allowed`, or if one of them is not in CHANGEABLE_ON_RESUME."""
    changes = config_changes(old, new)
    if not changes:
        return []
    shown = ", ".join(
        f"{k} ({flat_items(old.model_dump()).get(k)!r} -> {flat_items(new.model_dump()).get(k)!r})" for k in changes[:3]
    )
    fixed = [k for k in changes if not any(k == c or k.startswith(c) for c in CHANGEABLE_ON_RESUME)]
    if fixed:
        raise ConfigError(
            f"{where}: a resumed run cannot change {fixed[0]}: the completed rounds depend on it "
            f"(start a new run; only {CHANGEABLE_SAID} can change)"
        )
    if not allowed:
        raise ConfigError(
            f"{where}: the configuration differs from the run's: {shown}; add --change-config to apply it"
        )
    return changes


def _set(tree: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {key} is not a section")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word is a string
    node[keys[-1]] = value


def to_toml(config: RunConfig) -> str:
    """`config` as a TOML file `load_config` reads back to the same configuration (every field,
    defaults included; unset optional ones are left out, as TOML has no null)."""
    import tomli_w

    def drop_none(tree: object) -> object:
        if isinstance(tree, dict):
            return {k: drop_none(v) for k, v in tree.items() if v is not None}
        return [drop_none(v) for v in tree] if isinstance(tree, list) else tree

    return tomli_w.dumps(drop_none(config.model_dump(mode="json", by_alias=True)))


def load_config(path: str | Path | None = None, overrides: list[str] = (), base: dict | None = None) -> RunConfig:
    """The TOML file at `path` (or the `base` tree, or the defaults) with `--set` overrides applied."""
    tree: dict = json.loads(json.dumps(base)) if base is not None else {}
    if path is not None:
        try:
            tree = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config file at {path}") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path}: not valid TOML ({error})") from None
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set takes key=value, got {item!r}")
        _set(tree, key.strip(), value.strip())
    return validate_config(tree)


def validate_config(tree: dict, where: str = "") -> RunConfig:
    """`tree` as a RunConfig, or a one-line ConfigError naming the key (prefixed by `where`)."""
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as error:
        first = error.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        prefix = f"{where}: " if where else ""
        if first["type"] == "extra_forbidden":
            section = first["loc"][:-1]
            model = RunConfig
            for part in section:
                model = model.model_fields[str(part)].annotation
            raise ConfigError(f"{prefix}unknown key {key!r}; allowed: {', '.join(model.model_fields)}") from None
        if not key:  # a check across sections: its message names what is wrong
            raise ConfigError(f"{prefix}{first['msg'].removeprefix('Value error, ')}") from None
        raise ConfigError(f"{prefix}bad value for {key!r}: {first['msg']}") from None
