"""fedse's environments behind AgentGym's HTTP protocol (`fedse serve-env ENV`).

The endpoints, field names and reply shapes are those of AgentGym's own servers
(docs/environments.md, and `fedse.envs.remote.DIALECTS` for the client side), so AgentGym's
client classes and evaluation scripts run against fedse's games unmodified. Like upstream,
a failed request answers HTTP 200 with `{"error": "..."}`; unlike upstream, every request
is checked first (unknown id, missing field, wrong type, oversized body) and the server
keeps serving whatever a client sends.

Each `create` makes one session with its own environment instance; a session's calls are
serialised by its lock, different sessions run concurrently, and a session idle for longer
than `ttl` seconds is dropped.
"""

import itertools
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fedse.envs.base import EnvError, StepResult, TextEnv
from fedse.envs.remote import DIALECTS, Dialect
from fedse.errors import UserError

MAX_BODY = 64 * 1024
"""Bytes a request body may have; a longer one (a 1 MB action) is refused, and never read whole."""
DRAIN_LIMIT = 2 * 2**20
"""Bytes of an over-long body read (and dropped) so that its sender still gets a reply."""
MAX_SESSIONS_PER_CLIENT = 256
"""Sessions one client address may hold open at once, so that one client cannot take them all."""
MAX_CONNECTIONS = 256
"""Connections (and requests in flight) the server holds at once; more are answered 503."""
KEEP_ALIVE = 5.0
"""Seconds an idle connection is kept open between requests."""
REQUEST_DEADLINE = 10.0
"""Seconds a request has to arrive whole (headers and body); a slower sender is disconnected."""

GREETINGS = {
    "babyai": "This is environment BabyAI.",
    "lmrlgym": "This is environment LMRL-Gym.",
    "textcraft": "This is environment TextCraft.",
    "webshop": "ok",
}
SERVERS = {"babyai": ["babyai"], "lmrlgym": ["maze", "wordle"], "textcraft": ["textcraft"], "webshop": ["webshop"]}
"""What `fedse serve-env` can serve, as AgentGym groups its servers: LMRL-Gym holds Maze and Wordle."""
for _env in ("maze", "wordle"):
    SERVERS[_env] = [_env]


def served_envs(server: str, known: list[str]) -> list[str]:
    """The environments `fedse serve-env <server>` serves: an AgentGym server's group (lmrlgym:
    Maze and Wordle), or any one environment fedse knows (your own included)."""
    if server in SERVERS:
        return SERVERS[server]
    if server in known:
        return [server]
    raise UserError(
        f"unknown environment server {server!r}; choose one of: {', '.join(dict.fromkeys([*SERVERS, *known]))}"
    )


class RequestError(Exception):
    """A request the server refuses; its text goes back as {"error": ...}."""


@dataclass
class Session:
    env: TextEnv
    owner: str = ""
    """The client address that created it."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    used: float = field(default_factory=time.monotonic)


class SessionTable:
    """The environment instances of one server, by id; idle ones expire."""

    def __init__(
        self, make: Callable[[], TextEnv], ttl: float, max_sessions: int, per_client: int = MAX_SESSIONS_PER_CLIENT
    ) -> None:
        self.make, self.ttl, self.max_sessions, self.per_client = make, ttl, max_sessions, per_client
        self.sessions: dict[int, Session] = {}
        self.ids = itertools.count()
        self.lock = threading.Lock()

    def create(self, owner: str = "") -> int:
        with self.lock:
            self.expire()
            if len(self.sessions) >= self.max_sessions:
                raise RequestError(f"server full: {self.max_sessions} sessions open; close some with POST /close")
            if sum(s.owner == owner for s in self.sessions.values()) >= self.per_client:
                raise RequestError(
                    f"client {owner or '?'} already holds {self.per_client} sessions; close some with POST /close"
                )
        env = self.make()
        with self.lock:
            id_ = next(self.ids)
            self.sessions[id_] = Session(env, owner)
        return id_

    def get(self, id_: int) -> Session:
        with self.lock:
            self.expire()
            session = self.sessions.get(id_)
            if session is None:
                raise RequestError(
                    f"unknown id {id_}: create an environment with POST /create first "
                    f"(sessions expire after {self.ttl:g} s idle)"
                )
            session.used = time.monotonic()
            return session

    def close(self, id_: int) -> bool:
        with self.lock:
            return self.sessions.pop(id_, None) is not None

    def expire(self) -> None:
        now = time.monotonic()
        for id_ in [i for i, s in self.sessions.items() if now - s.used > self.ttl]:
            del self.sessions[id_]


def _int(body: dict, key: str) -> int:
    value = body.get(key)
    if key not in body:
        raise RequestError(f"missing field {key!r}")
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"field {key!r} must be an integer, got {json.dumps(value)[:40]}")
    return value


def _str(body: dict, key: str) -> str:
    if key not in body:
        raise RequestError(f"missing field {key!r}")
    if not isinstance(body[key], str):
        raise RequestError(f"field {key!r} must be a string, got {json.dumps(body[key])[:40]}")
    return body[key]


def started(session: Session, id_: int) -> TextEnv:
    """The session's environment, once a task was reset in it (call with its lock held)."""
    if session.env.task_id is None:
        raise RequestError(f"environment {id_} has no task yet: POST /reset first")
    return session.env


@dataclass
class EnvService:
    """One environment's endpoints, as pure functions of parsed JSON (the app only routes)."""

    name: str
    table: SessionTable

    @property
    def dialect(self) -> Dialect:
        """The built-in game's own server's spelling; AgentGym's common one for an environment of your own."""
        return DIALECTS.get(self.name) or Dialect()

    def create(self, body: dict, owner: str = "") -> Any:
        id_ = self.table.create(owner)
        if self.name == "webshop":
            return id_
        if self.name == "textcraft":  # upstream resets a new instance with data_idx = id
            return {"id": id_, "observation": self._reset(id_, id_), "done": False, "reward": 0}
        return {"id": id_}

    def reset(self, body: dict) -> Any:
        d = self.dialect
        id_, task = _int(body, d.id_field), _int(body, d.task_field)
        observation = self._reset(id_, task)
        return {
            "babyai": {"observation": observation, "reward": 0.0, "score": 0.0, "deleted": False, "done": False},
            "maze": {"observation": observation},
            "wordle": {"id": id_, "observation": observation},
            "textcraft": {"id": id_, "observation": observation, "done": False, "reward": 0},
            "webshop": [observation, None],
        }.get(self.name, {"id": id_, "observation": observation, "done": False, "reward": 0})  # yours: the common shape

    def step(self, body: dict) -> Any:
        id_, action = _int(body, self.dialect.id_field), _str(body, "action")
        session = self.table.get(id_)
        with session.lock:
            env = started(session, id_)
            if env.done:
                raise RequestError(f"The task with environment {id_} has finished.")
            result: StepResult = env.step_action(action)
            per_step = env.last_reward if self.name == "babyai" else result.reward
        if self.name == "webshop":
            return {"state": result.observation, "reward": result.reward, "done": result.done, "info": None}
        if self.name == "babyai":
            return {"observation": result.observation, "reward": per_step, "score": result.reward, "done": result.done}
        return {"observation": result.observation, "reward": result.reward, "done": result.done}

    def observation(self, id_: int) -> Any:
        session = self.table.get(id_)
        with session.lock:
            return started(session, id_).observation()

    def available_actions(self, id_: int | None) -> Any:
        if self.name == "maze":
            from fedse.envs.maze import MOVES

            return list(MOVES)
        session = self.table.get(id_)
        with session.lock:
            env = started(session, id_)
            return {"has_search_bar": env.page.kind == "start", "clickables": list(env.clickables())}

    def close(self, body: dict) -> bool:
        return self.table.close(_int(body, self.dialect.id_field))

    def _reset(self, id_: int, task: int) -> str:
        session = self.table.get(id_)
        with session.lock:
            return session.env.reset(task)


def make_app(
    server: str, *, ttl: float = 600.0, max_sessions: int = 4096, make_env: Callable[[str], TextEnv] | None = None
):
    """A FastAPI app serving `server` (an environment, or 'lmrlgym' for Maze and Wordle)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.concurrency import run_in_threadpool

    from fedse.envs import list_envs
    from fedse.envs import make_env as default_make_env

    served = served_envs(server, list_envs())
    make_env = make_env or default_make_env
    app = FastAPI(title=f"fedse {server}", docs_url=None, redoc_url=None, openapi_url=None)
    greeting = GREETINGS.get(server) or GREETINGS["lmrlgym"]

    async def bounded_body(request: Request) -> bytes:
        """The body, holding at most MAX_BODY bytes of it. A longer one is refused: up to
        DRAIN_LIMIT bytes are read and dropped first, so that an ordinary client gets the error
        as a reply; a declared length beyond that is refused before any of it is read."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > DRAIN_LIMIT:
            raise RequestError(f"request body of {declared} bytes is over the limit of {MAX_BODY}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > DRAIN_LIMIT:
                break
            if size <= MAX_BODY:
                chunks.append(chunk)
        if size > MAX_BODY:
            raise RequestError(
                f"request body of {size if size <= DRAIN_LIMIT else 'over ' + str(DRAIN_LIMIT)} bytes is over the limit of {MAX_BODY}"
            )
        return b"".join(chunks)

    async def answer(request: Request, work: Callable[[dict], Any], *, body: bool = True) -> JSONResponse:
        try:
            parsed: Any = {}
            if body:
                raw = await bounded_body(request)
                parsed = json.loads(raw) if raw.strip() else {}
                if not isinstance(parsed, dict):
                    raise RequestError("the request body must be a JSON object")
            else:
                parsed = dict(request.query_params)
            reply = await run_in_threadpool(work, parsed)
        except (RequestError, EnvError) as e:
            reply = {"error": str(e)}
        except ValueError as e:  # a body that is not JSON
            reply = {"error": f"bad request: {e}"}
        except Exception as e:  # keep serving whatever one request did
            reply = {"error": f"internal error: {type(e).__name__}: {e}"}
        return JSONResponse(reply)

    def query_id(service: EnvService, query: dict) -> int:
        key = service.dialect.id_field
        if key not in query:
            raise RequestError(f"missing query parameter {key!r}")
        try:
            return int(query[key])
        except ValueError:
            raise RequestError(f"query parameter {key!r} must be an integer, got {query[key][:40]!r}") from None

    @app.get("/")
    async def hello():
        return greeting

    app.state.sessions = {}  # env -> its SessionTable, for inspection
    for env_name in served:
        service = EnvService(env_name, SessionTable(lambda n=env_name: make_env(n), ttl, max_sessions))
        app.state.sessions[env_name] = service.table
        prefix = service.dialect.prefix

        def add(
            path: str, method: str, work: Callable[[EnvService, dict], Any], body: bool = True, s=service, prefix=prefix
        ) -> None:
            async def endpoint(request: Request) -> JSONResponse:
                if work is EnvService.create:  # sessions are counted per client address
                    owner = request.client.host if request.client else ""
                    return await answer(request, lambda parsed: s.create(parsed, owner), body=body)
                return await answer(request, lambda parsed: work(s, parsed), body=body)

            app.add_api_route(prefix + path, endpoint, methods=[method])

        add("/create", "POST", EnvService.create)
        add("/reset", "POST", EnvService.reset)
        add("/step", "POST", EnvService.step)
        add("/close", "POST", EnvService.close)
        if env_name == "webshop":
            add("/observation", "GET", lambda s, q: s.observation(query_id(s, q)), body=False)
            add("/available_actions", "GET", lambda s, q: s.available_actions(query_id(s, q)), body=False)
            add("/list_envs", "GET", lambda s, q: sorted(s.table.sessions), body=False)
        if env_name == "maze":
            add("/available_actions", "GET", lambda s, q: s.available_actions(None), body=False)
        if env_name == "wordle":
            from fedse.envs.wordle import VOCAB

            add("/filtered_vocab", "GET", lambda s, q: list(VOCAB), body=False)
    return app


def server_config(app: Any, host: str, port: int, request_deadline: float = REQUEST_DEADLINE) -> Any:
    """The uvicorn configuration `fedse serve-env` runs `app` with: its limits on connections,
    idle keep-alive, header size and request arrival time (`fedse.envs.http_deadline`)."""
    import uvicorn

    from fedse.envs.http_deadline import with_deadline

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        http=with_deadline(request_deadline),
        limit_concurrency=MAX_CONNECTIONS,
        timeout_keep_alive=int(KEEP_ALIVE),
        h11_max_incomplete_event_size=MAX_BODY,
    )


def serve(server: str, host: str = "127.0.0.1", port: int = 36001, ttl: float = 600.0) -> None:
    """Run the server until interrupted (uvicorn, one process, sessions in threads)."""
    import uvicorn

    app = make_app(server, ttl=ttl)
    print(f"fedse: serving {server} ({', '.join(app.state.sessions)}) at http://{host}:{port}", flush=True)
    uvicorn.Server(server_config(app, host, port)).run()
