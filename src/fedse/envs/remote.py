"""An environment played on an AgentGym environment server (docs/environments.md).

`RemoteEnv` keeps fedse's protocol: the model's text is parsed here, as AgentGym's client
parses it, and only the action string goes to the server, which applies it. Each server
names its endpoints and fields its own way (`Dialect`); the quirks are upstream's:
WebShop says `env_idx` and `session_id`, answers `reset` with `[observation, null]` and
its `create` with a bare integer; LMRL-Gym serves Maze and Wordle under `/maze` and
`/wordle`; BabyAI's reward is the cumulative `score`; errors come back as HTTP 200 with
`{"error": ...}`. A server that is down or answers garbage raises an `EnvServerError` naming the
server and the endpoint: an episode is never cut short without saying so.

The instruction, the turn limit, the splits and the expert come from the in-process
copy of the environment: the server holds the game, fedse holds the rules text.
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from fedse.envs.base import (
    ONLY_ONE_ACTION,
    EnvError,
    StepResult,
    TextEnv,
    parse_action_lmrl,
    parse_action_single_line,
    parse_ranges,
)
from fedse.sections import Section


class Dialect(Section):
    """How one AgentGym server spells the environment protocol; as `[env.<name>.dialect]`, your
    server's (each field defaults to AgentGym's common spelling, BabyAI's and TextCraft's)."""

    prefix: str = ""
    """Path prefix of every endpoint ('/maze' for LMRL-Gym's Maze)."""
    id_field: str = "id"
    """The `create` reply's field naming the new instance."""
    task_field: str = "data_idx"
    """The `reset` field carrying the task id."""
    reward_field: str = "reward"
    """The `step` reply's reward field."""
    observation_field: str = "observation"
    """The `step` reply's observation field."""
    create_body: dict | None = None
    """The JSON body `create` sends (None: no body)."""
    observation_after_reset: bool = False
    """The first observation is read with GET /observation (WebShop), not from the reset reply."""


DIALECTS: dict[str, Dialect] = {
    "babyai": Dialect(reward_field="score"),
    "maze": Dialect(prefix="/maze", task_field="game"),
    "wordle": Dialect(prefix="/wordle", task_field="seed"),
    "textcraft": Dialect(create_body={"commands": None, "goal": None}),
    "webshop": Dialect(
        id_field="env_idx", task_field="session_id", observation_field="state", observation_after_reset=True
    ),
}
"""The five built-in games' servers: instances of the same mechanism a server of your own uses."""


class EnvServerError(EnvError):
    """An environment server that is down, refuses a call or answers garbage. Unlike a game's
    own bug, it is not one episode's failure: rollouts let it through, and the round stops."""


_CONNECTION_ERRORS = (urllib.error.URLError, ConnectionError, TimeoutError, OSError)


class EnvBackend(Section):
    """One environment's `[env.<name>]` table in a run configuration: which game (for an
    environment of your own, its class and options) and where its games run."""

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)
    class_: str | None = Field(None, alias="class")
    """"package.module:ClassName" of an environment of your own (a `TextEnv`), named `<name>`."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments its class is built with."""

    backend: Literal["local", "http", "node"] = "local"
    """local: in this process; http: on an AgentGym-compatible server at `url`; node: defined on
    the Flower node that holds it, by that node's own configuration (the server knows its name only)."""
    url: str | None = None
    """The server's base address, e.g. http://127.0.0.1:36001 (LMRL-Gym: without /maze)."""
    timeout: float = Field(30.0, gt=0)
    """Seconds one request may take."""
    retries: int = Field(3, ge=0)
    """Extra tries after a connection error, with doubling waits from 0.2 s."""

    dialect: Dialect | None = None
    """How the server spells the protocol (default: the game's own server's for AgentGym's games,
    AgentGym's common spelling for others)."""
    instruction: str | None = None
    """A game that runs only on its server (no class in fedse): the instruction its agent gets..."""
    instruction_file: str | None = None
    """...or the file that holds it (UTF-8);"""
    max_turns: int | None = Field(None, ge=1)
    """its turn limit;"""
    train: str | None = None
    """its train task ids, as ranges: "0-99,120";"""
    test: str | None = None
    """its test task ids;"""
    action: Literal["line", "after"] = "line"
    """and how an action is read from the model's text: the one `Action:` line, cleaned
    (AgentGym's BabyAI and TextCraft clients), or the text after `Action:` (LMRL-Gym's)."""

    @model_validator(mode="after")
    def _url_fits(self) -> EnvBackend:
        if self.backend == "http":
            parsed = urllib.parse.urlparse(self.url or "")
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise ValueError(f"backend 'http' needs url = 'http://host:port', got {self.url!r}")
        elif self.url is not None:
            raise ValueError("url is only for backend = 'http'")
        given = [
            k
            for k, f in type(self).model_fields.items()
            if k != "backend" and getattr(self, k) != f.get_default(call_default_factory=True)
        ]
        if self.backend == "node" and given:
            extra = [type(self).model_fields[k].alias or k for k in given]
            raise ValueError(
                f"backend = 'node' takes no other key ({extra[0]}): the node that holds it defines it in its own "
                "configuration (fedse flower node --env-config)"
            )
        return self


class RemoteEnv(TextEnv):
    """`local`'s game, played on the AgentGym server at `url` (one server-side instance)."""

    def __init__(
        self, local: TextEnv, url: str, *, timeout: float = 30.0, retries: int = 3, dialect: Dialect | None = None
    ) -> None:
        super().__init__()
        self.local = local
        self.name, self.instruction, self.max_turns = local.name, local.instruction, local.max_turns
        self.num_tasks, self.rejection = local.num_tasks, local.rejection
        self.rejection_shows_observation = local.rejection_shows_observation
        self.success_of = local.success_of
        self.dialect = dialect or DIALECTS.get(local.name) or Dialect()
        self.url = url.rstrip("/")
        self.timeout, self.retries = timeout, retries
        self.env_id: int | None = None

    @property
    def splits(self) -> dict[str, tuple[int, ...]]:
        return self.local.splits

    # --- the protocol -------------------------------------------------------------------

    def start_task(self, task_id: int) -> str:
        d = self.dialect
        if self.env_id is None:
            reply = self._call("POST", "/create", d.create_body, idempotent=True)
            self.env_id = (
                reply
                if isinstance(reply, int) and not isinstance(reply, bool)
                else self._field(reply, "id", "/create", int)
            )
        reply = self._call("POST", "/reset", {d.id_field: self.env_id, d.task_field: task_id}, idempotent=True)
        if d.observation_after_reset:
            return self.observation()
        return self._field(reply, "observation", "/reset", str)

    def parse_action(self, model_output: str) -> str | None:
        return self.local.parse_action(model_output)

    def act(self, action: str) -> StepResult:
        d = self.dialect
        # Not retried once sent: a step that reached the server may have been applied.
        reply = self._call("POST", "/step", {d.id_field: self.env_id, "action": action}, idempotent=False)
        observation = self._field(reply, d.observation_field, "/step", str)
        reward = float(self._field(reply, d.reward_field, "/step", (int, float)))
        done = self._field(reply, "done", "/step", bool)
        return StepResult(observation, reward, done, self.success_of(reward, done), action)

    def observation(self) -> str:
        return self._field(
            self._call("GET", "/observation", query={self.dialect.id_field: self.env_id}, idempotent=True),
            None,
            "/observation",
            str,
        )

    def expert(self, task_id: int) -> list[str]:
        return self.local.expert(task_id)

    def close(self) -> None:
        """Free the server-side instance (best effort: servers also expire idle ones)."""
        if self.env_id is not None:
            with contextlib.suppress(EnvServerError):
                self._call("POST", "/close", {self.dialect.id_field: self.env_id}, idempotent=True, tries=1)
            self.env_id = None

    # --- HTTP -----------------------------------------------------------------------------

    def _where(self, method: str, path: str) -> str:
        return f"{self.name} server {self.url}: {method} {self.dialect.prefix}{path}"

    def _call(
        self,
        method: str,
        path: str,
        body: dict | None = None,
        *,
        query: dict | None = None,
        idempotent: bool,
        tries: int | None = None,
    ) -> Any:
        """One request; JSON in and out. Retries connection failures (a refused connection
        always, others only for idempotent calls) and HTTP 503, with doubling waits."""
        url = self.url + self.dialect.prefix + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        data = json.dumps(body).encode() if body is not None else b""
        headers = {"Content-Type": "application/json"} if body is not None else {}
        where = self._where(method, path)
        attempts = 1 + self.retries if tries is None else tries
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                request = urllib.request.Request(
                    url, data=data if method == "POST" else None, headers=headers, method=method
                )
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
                break
            except urllib.error.HTTPError as e:
                if e.code == 503 and not last:
                    time.sleep(0.2 * 2**attempt)
                    continue
                detail = e.read()[:200].decode("utf-8", "replace")
                raise EnvServerError(f"{where} answered HTTP {e.code}: {detail}") from None
            except _CONNECTION_ERRORS as e:
                reason = getattr(e, "reason", e)
                refused = isinstance(reason, ConnectionRefusedError)
                if not last and (refused or idempotent):
                    time.sleep(0.2 * 2**attempt)
                    continue
                raise EnvServerError(f"{where} failed ({reason}); is the server running and reachable?") from None
        try:
            reply = json.loads(raw)
        except ValueError:
            raise EnvServerError(f"{where} answered something that is not JSON: {raw[:80]!r}") from None
        if isinstance(reply, dict) and "error" in reply:
            raise EnvServerError(f"{where} answered an error: {reply['error']}")
        return reply

    def _field(self, reply: Any, key: str | None, path: str, kind: type | tuple[type, ...]) -> Any:
        """reply[key] (or the reply itself), checked to be of `kind`; else an EnvServerError naming the endpoint."""
        value = reply if key is None else reply.get(key) if isinstance(reply, dict) else None
        ok = isinstance(value, kind) and not (isinstance(value, bool) and kind is not bool)
        if not ok:
            shown = json.dumps(reply)[:120]
            wanted = f"field {key!r}" if key else "a value"
            raise EnvServerError(
                f"{self._where('POST' if path != '/observation' else 'GET', path)} answered without {wanted} of the expected type: {shown}"
            )
        return value


class ServedGame(TextEnv):
    """The rules of a game that runs only on its server, from its `[env.<name>]` table: the
    instruction, the turn limit, the splits and the action parsing (no expert; fedse cannot play
    it in process). `fedse.envs.make_env` plays it on the server through `RemoteEnv`."""

    num_tasks = None

    def __init__(self, name: str, table: EnvBackend) -> None:
        super().__init__()
        where = f"environment {name!r} ([env.{name}], a game on its server only)"
        text = table.instruction
        if table.instruction_file is not None:
            try:
                text = Path(table.instruction_file).read_text(encoding="utf-8")
            except OSError as error:
                raise EnvError(f"{where}: cannot read instruction_file ({error})") from None
        missing = [k for k, v in (("instruction", text), ("max_turns", table.max_turns), ("train", table.train),
                                  ("test", table.test), ("url", table.url)) if v is None]  # fmt: skip
        if missing:
            raise EnvError(
                f"{where} needs {missing[0]} (and url, instruction or instruction_file, max_turns, train, test)"
            )
        self.name, self.instruction, self.max_turns = name, text, table.max_turns
        try:
            self._splits = {"train": parse_ranges(table.train), "test": parse_ranges(table.test)}
        except ValueError:
            raise EnvError(f"{where}: train and test are id ranges such as '0-99,120'") from None
        self._read = parse_action_single_line if table.action == "line" else parse_action_lmrl
        self.rejection = ONLY_ONE_ACTION if table.action == "line" else ""

    @property
    def splits(self) -> dict[str, tuple[int, ...]]:
        return self._splits

    def parse_action(self, model_output: str) -> str | None:
        return self._read(model_output)

    def start_task(self, task_id: int) -> str:
        raise EnvError(f"{self.name} runs only on its server: play it through make_env({self.name!r}, its backend)")

    def act(self, action: str) -> StepResult:
        raise EnvError(f"{self.name} runs only on its server: play it through make_env({self.name!r}, its backend)")
