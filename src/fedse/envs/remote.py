"""An environment played on an AgentGym environment server (environments.md §8).

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
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from fedse.envs.base import EnvError, StepResult, TextEnv
from fedse.sections import Section


@dataclass(frozen=True)
class Dialect:
    """How one AgentGym server spells the environment protocol."""

    prefix: str
    """Path prefix of every endpoint ('/maze' for LMRL-Gym's Maze)."""
    id_field: str
    task_field: str
    """The `reset` field carrying the task id."""
    reward_field: str
    observation_field: str
    """The `step` reply's observation field."""
    create_body: dict | None = None
    observation_after_reset: bool = False
    """The first observation is read with GET /observation (WebShop), not from the reset reply."""


DIALECTS: dict[str, Dialect] = {
    "babyai": Dialect("", "id", "data_idx", "score", "observation"),
    "maze": Dialect("/maze", "id", "game", "reward", "observation"),
    "wordle": Dialect("/wordle", "id", "seed", "reward", "observation"),
    "textcraft": Dialect("", "id", "data_idx", "reward", "observation", create_body={"commands": None, "goal": None}),
    "webshop": Dialect("", "env_idx", "session_id", "reward", "state", observation_after_reset=True),
}


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

    backend: Literal["local", "http"] = "local"
    """local: in this process; http: on an AgentGym-compatible server at `url`."""
    url: str | None = None
    """The server's base address, e.g. http://127.0.0.1:36001 (LMRL-Gym: without /maze)."""
    timeout: float = Field(30.0, gt=0)
    """Seconds one request may take."""
    retries: int = Field(3, ge=0)
    """Extra tries after a connection error, with doubling waits from 0.2 s."""

    @model_validator(mode="after")
    def _url_fits(self) -> EnvBackend:
        if self.backend == "http":
            parsed = urllib.parse.urlparse(self.url or "")
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise ValueError(f"backend 'http' needs url = 'http://host:port', got {self.url!r}")
        elif self.url is not None:
            raise ValueError("url is only for backend = 'http'")
        return self


class RemoteEnv(TextEnv):
    """`local`'s game, played on the AgentGym server at `url` (one server-side instance)."""

    def __init__(self, local: TextEnv, url: str, *, timeout: float = 30.0, retries: int = 3) -> None:
        super().__init__()
        if local.name not in DIALECTS:
            raise EnvError(f"no AgentGym server protocol for {local.name!r}; one of: {', '.join(DIALECTS)}")
        self.local = local
        self.name, self.instruction, self.max_turns = local.name, local.instruction, local.max_turns
        self.num_tasks, self.rejection = local.num_tasks, local.rejection
        self.rejection_shows_observation = local.rejection_shows_observation
        self.success_of = local.success_of
        self.dialect = DIALECTS[local.name]
        self.url = url.rstrip("/")
        self.timeout, self.retries = timeout, retries
        self.env_id: int | None = None

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
