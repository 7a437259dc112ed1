"""Hostile and unlucky users: bounded updates, robust rules, configuration at and past its
bounds, resume with a changed configuration, buffer cap + dedup, retention, personal state,
adversarial environment input, and a soak of many rounds."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import annotated_types
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedse.agent.lora import A_SUFFIX, Adapter
from fedse.agent.model import load_base
from fedse.agent.policy import Policy
from fedse.agent.trajectory import Trajectory
from fedse.cli import main
from fedse.envs import make_env
from fedse.errors import UserError
from fedse.evolve.buffer import BufferSection, ExperienceBuffer
from fedse.experiments.config import ConfigError, RunConfig, load_config
from fedse.experiments.federation import Federation
from fedse.fl.aggregators import AGGREGATORS, make_aggregator
from fedse.fl.server import aggregate_round
from fedse.fl.update import DEFAULT_MAX_UPDATE_NORM, Update, bound_update, update_norm
from helpers import TINY, random_factors, tiny_config, updates_for

# --- hostile updates ---------------------------------------------------------------------------

SCALES = st.sampled_from([0.0, 1e-3, 1.0, 10.0, 1e3, 1e6, 1e20, 1e300, math.inf, -math.inf, math.nan])
EXAMPLES = st.one_of(st.integers(-(10**18), 10**18), st.booleans(), st.floats(allow_nan=True), st.none(), st.just("12"))
KINDS = st.sampled_from(["tensor", "list", "none", "meta", "string", "float64", "shape"])


def hostile(current: Adapter, aggregator, client: str, scale: float, examples, kind: str, seed: int) -> Update:
    [update] = updates_for(aggregator.name, current, k=1)
    honest, inputs = update.tensors, {k: v * min(abs(scale), 1e300) for k, v in update.inputs.items()}
    if not honest:  # a rule whose clients upload nothing (local): anything sent is unexpected
        return Update(client, {} if kind == "tensor" else {"stray.lora_A.weight": torch.zeros(2)}, examples)
    key = sorted(honest)[seed % len(honest)]
    tensors = {k: current.tensors[k] + (v - current.tensors[k]) * scale for k, v in honest.items()}
    bad = {
        "tensor": tensors[key],
        "list": tensors[key].tolist(),
        "none": None,
        "meta": torch.empty(tensors[key].shape, device="meta"),
        "string": "AAAA",
        "float64": tensors[key].double(),
        "shape": tensors[key].flatten(),
    }[kind]
    return Update(client, {**tensors, key: bad}, examples, inputs=inputs)


@pytest.mark.parametrize("name", list(AGGREGATORS))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    clients=st.lists(st.tuples(SCALES, EXAMPLES, KINDS, st.integers(0, 3)), min_size=1, max_size=5),
    duplicate=st.booleans(),
)
def test_hostile_updates_are_rejected_or_bounded_never_an_exception(name, clients, duplicate):
    current = random_factors(0)
    aggregator = make_aggregator(name)
    updates = [
        hostile(current, aggregator, f"c{i}", scale, examples, kind, seed)
        for i, (scale, examples, kind, seed) in enumerate(clients)
    ]
    if duplicate:
        updates.append(updates[0])
    result = aggregate_round(aggregator, current, updates, {})
    assert set(result.accepted) | set(result.rejected) == {u.client for u in updates}
    new = result.aggregation.adapter.tensors
    assert all(torch.isfinite(t).all() for t in new.values())
    assert all(torch.isfinite(d).all() for d in result.aggregation.base_delta.values())
    if not aggregator.mutates_base:  # a mean moves at most as far as one bounded update
        moved = update_norm(Update("global", aggregator.upload(new), 0), current.tensors)
        per_entry = math.sqrt(max(1, len(result.accepted))) if aggregator.robust else 1.0
        assert moved <= DEFAULT_MAX_UPDATE_NORM * per_entry * (1 + 1e-6)
    if duplicate:
        assert "c0" in result.rejected and "sent 2 updates" in result.rejected["c0"][0]


def test_an_update_beyond_the_norm_bound_is_clipped_onto_it_or_rejected():
    current = random_factors(0)
    update = updates_for("fedse", current, k=1)[0]
    far = Update("far", {k: current.tensors[k] + (v - current.tensors[k]) * 50 for k, v in update.tensors.items()}, 3)
    norm = update_norm(far, current.tensors)
    assert norm > DEFAULT_MAX_UPDATE_NORM
    clipped, measured = bound_update(far, current.tensors, DEFAULT_MAX_UPDATE_NORM, "clip")
    assert measured == pytest.approx(norm)
    assert update_norm(clipped, current.tensors) == pytest.approx(DEFAULT_MAX_UPDATE_NORM)
    key = sorted(update.tensors)[0]
    direction = far.tensors[key] - current.tensors[key]
    torch.testing.assert_close(clipped.tensors[key] - current.tensors[key], direction * DEFAULT_MAX_UPDATE_NORM / norm)
    result = aggregate_round(make_aggregator("fedse"), current, [far], {})
    assert result.clipped == {"far": pytest.approx(norm)} and result.accepted == ["far"]
    rejected = aggregate_round(make_aggregator("fedse"), current, [far], {}, bound="reject")
    assert "above the bound 100" in rejected.rejected["far"][0]
    assert bound_update(far, current.tensors, DEFAULT_MAX_UPDATE_NORM, "off") == (far, pytest.approx(norm))


@pytest.mark.parametrize("name", ["median", "trimmed"])
def test_robust_rules_keep_every_entry_within_the_honest_clients_range(name):
    current = random_factors(0)
    honest = updates_for("fedse", current, k=4)
    # finite, within every per-entry limit and the norm bound, yet far from the honest ones
    attacker = Update("evil", {k: current.tensors[k] + 5.0 for k in current.tensors}, 1)
    aggregator = make_aggregator(name, trim=0.2)
    assert aggregator.robust and not aggregator.linear and not AGGREGATORS["fedse"].robust
    result = aggregate_round(aggregator, current, [*honest, attacker], {}, bound="off")
    for key, got in result.aggregation.adapter.tensors.items():
        stack = torch.stack([u.tensors[key] for u in honest])
        assert (got >= stack.min(0).values - 1e-6).all() and (got <= stack.max(0).values + 1e-6).all()
    mean = aggregate_round(make_aggregator("fedse"), current, [*honest, attacker], {}, bound="off")
    key = sorted(current.tensors)[0]
    assert (mean.aggregation.adapter.tensors[key] - result.aggregation.adapter.tensors[key]).abs().max() > 0.5


def test_median_of_an_even_count_is_the_mean_of_the_middle_two_and_trim_zero_is_the_mean():
    current = random_factors(0)
    updates = updates_for("fedse", current, k=4)
    key = sorted(current.tensors)[0]
    stack = torch.stack([u.tensors[key] for u in updates]).sort(0).values
    median = aggregate_round(make_aggregator("median"), current, updates, {}).aggregation.adapter.tensors[key]
    torch.testing.assert_close(median, (stack[1] + stack[2]) / 2)
    plain = aggregate_round(make_aggregator("fedse"), current, updates, {}).aggregation.adapter.tensors[key]
    trim0 = aggregate_round(make_aggregator("trimmed", trim=0.0), current, updates, {}).aggregation.adapter.tensors
    torch.testing.assert_close(trim0[key], plain)
    with pytest.raises(ValueError, match="trim must be in"):
        make_aggregator("trimmed", trim=0.5)


# --- configuration at and past its bounds ------------------------------------------------------


def bounded_fields():
    """(dotted key, bound kind, bound) for every numeric constraint of RunConfig's sections."""
    out = []
    for section, info in RunConfig.model_fields.items():
        model = info.annotation
        if not hasattr(model, "model_fields"):
            continue
        for name, field in model.model_fields.items():
            for m in field.metadata:
                for kind in ("ge", "gt", "le", "lt"):
                    if isinstance(m, getattr(annotated_types, kind.capitalize())):
                        out.append((f"{section}.{name}", kind, getattr(m, kind)))
    return out


BOUNDS = bounded_fields()


def test_the_bounded_fields_cover_every_section():
    assert {k.split(".")[0] for k, _, _ in BOUNDS} >= {"model", "fed", "explore", "buffer", "train", "eval"}


@pytest.mark.parametrize(("key", "kind", "bound"), BOUNDS, ids=[k for k, _, _ in BOUNDS])
def test_every_bounded_field_at_and_past_its_bound(tmp_path, capsys, key, kind, bound):
    inclusive = kind in ("ge", "le")
    step = 1 if isinstance(bound, int) else 1e-9
    past = bound - step if kind in ("ge", "gt") else bound + step
    if inclusive:
        load_config(None, [*TINY, f"{key}={bound!r}"])  # at the bound: accepted
    for value in [past, *([] if inclusive else [bound]), "inf", "-inf", "nan"]:
        sets = [f"--set={s}" for s in [*TINY, f"{key}={value}"]]
        rc = main(["run", "--runs-dir", str(tmp_path), "--name", "x", *sets])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and key in err, (value, err)
        assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "setting",
    [
        "model.name='no-such-model'",
        "model.target_modules='q_proj'",
        "model.target_modules=['nope_proj']",
        "model.dtype='float16'",
        "fed.aggregator='krum'",
        "fed.update_bound='shrink'",
        "fed.clients=[]",
        "explore.filter='most'",
        "buffer.dedup='fuzzy'",
        "name='../x'",
    ],
)
def test_bad_values_are_one_line_errors_and_create_nothing(tmp_path, capsys, setting):
    sets = [] if setting.startswith("name") else [f"--set={s}" for s in TINY]
    rc = main(["run", "--runs-dir", str(tmp_path / "runs"), *sets, "--set", setting])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", ["..", ".", "../x", "/abs/dir", "a/b", "", "-rf", "x" * 101, "nul\x00"])
def test_hostile_run_names_create_and_delete_nothing(tmp_path, capsys, name):
    (tmp_path / "runs").mkdir()
    (tmp_path / "precious.txt").write_text("keep")
    rc = main(["run", "--runs-dir", str(tmp_path / "runs"), f"--name={name}", "--force", *[f"--set={s}" for s in TINY]])
    assert rc == 2 and "run name" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "keep" and list((tmp_path / "runs").iterdir()) == []


# --- resume with a changed configuration --------------------------------------------------------


def tiny_run(tmp_path: Path, *extra: str, name: str = "run") -> Federation:
    fed = Federation(tiny_config(*extra), tmp_path / name, Policy(load_base("tiny-random")))
    fed.run()
    return fed


def test_resume_refuses_a_changed_config_unless_told_and_never_a_fixed_key(tmp_path, capsys):
    fed = tiny_run(tmp_path, "fed.rounds=1")
    root = fed.store.root
    config = json.loads(fed.store.config_path.read_text())
    config["train"]["lr"] = 0.5  # an edited config.json
    fed.store.config_path.write_text(json.dumps(config))
    assert main(["run", "--resume", str(root)]) == 2
    assert "cannot change train.lr" in capsys.readouterr().err
    config["train"]["lr"] = 0.001
    fed.store.config_path.write_text(json.dumps(config))
    assert main(["run", "--resume", str(root), "--set", "fed.rounds=2"]) == 2
    assert "add --change-config" in capsys.readouterr().err
    assert main(["run", "--resume", str(root), "--set", "model.lora_rank=2", "--change-config"]) == 2
    assert "cannot change model.lora_rank" in capsys.readouterr().err
    assert main(["run", "--resume", str(root), "--set", "fed.rounds=2", "--change-config"]) == 0
    assert json.loads(fed.store.state.read_text())["round"] == 2
    assert json.loads(fed.store.config_path.read_text())["fed"]["rounds"] == 2


# --- buffer, retention, personal state --------------------------------------------------------


def trajectory(task: int, text: str) -> Trajectory:
    messages = [
        {"role": "user", "content": "instruction"},
        {"role": "assistant", "content": "OK"},
        {"role": "user", "content": f"obs {task}"},
        {"role": "assistant", "content": text},
    ]
    return Trajectory("maze", task, messages, 1.0, True, 1, None)


def test_cap_and_dedup_agree_between_the_running_buffer_and_one_reopened_from_disk(tmp_path):
    config = BufferSection(cap=3, dedup="exact")
    live = ExperienceBuffer(tmp_path / "b.jsonl", config)
    live.add([trajectory(i, "a") for i in range(3)], round_=0)
    live.add([trajectory(3, "a"), trajectory(4, "a")], round_=1)  # evicts tasks 0 and 1
    reopened = ExperienceBuffer(tmp_path / "b.jsonl", config)
    assert [t.task_id for t in reopened.training_set(1)] == [t.task_id for t in live.training_set(1)] == [2, 3, 4]
    again = [trajectory(0, "a"), trajectory(4, "a")]  # 0 was evicted: it may come back; 4 may not
    assert live.add(again, round_=2) == reopened.add(again, round_=2) == 1
    assert [t.task_id for t in live.training_set(2)] == [t.task_id for t in reopened.training_set(2)] == [3, 4, 0]


def test_a_resume_finds_the_entries_the_crashed_round_evicted(tmp_path):
    config = BufferSection(cap=2)
    live = ExperienceBuffer(tmp_path / "b.jsonl", config)
    live.add([trajectory(0, "a"), trajectory(1, "a")], round_=0)
    live.add([trajectory(2, "a"), trajectory(3, "a")], round_=1)  # round 1 crashes after this
    resumed = ExperienceBuffer(tmp_path / "b.jsonl", config)
    resumed.truncate(0)
    assert [t.task_id for t in resumed.training_set(0)] == [0, 1]
    assert len(Path(tmp_path / "b.jsonl").read_text().splitlines()) == 2


def test_retention_keeps_the_last_and_every_kth_and_personal_adapters_stay_with_clients(tmp_path):
    fed = tiny_run(
        tmp_path, "fed.rounds=4", "fed.aggregator='fedsa'", "checkpoints.keep_last=1", "checkpoints.keep_every=2"
    )
    assert fed.store.completed_rounds() == [0, 2, 4]
    for client in fed.clients:
        assert sorted(p.name for p in (fed.store.root / "clients" / client / "personal").iterdir()) == [
            "round_002",
            "round_004",
        ]
    server_files = [p.name for p in (fed.store.root / "checkpoints").rglob("*")]
    assert "clients" not in server_files and "personal" not in server_files
    resumed = Federation(
        tiny_config("fed.rounds=4", "fed.aggregator='fedsa'"), fed.store.root, Policy(load_base("tiny-random"))
    )
    resumed.load_checkpoint(4)
    for client in fed.clients:  # read back from the client's folder: what its last round trained
        mine, theirs = resumed.transport.states[client].personal(4).tensors, fed.policy.get(client).tensors
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
        assert any(
            not torch.equal(mine[k], resumed.global_adapter.tensors[k]) for k in mine if not k.endswith(A_SUFFIX)
        )


def test_base_deltas_are_stored_in_float32(tmp_path):
    from safetensors.torch import load_file

    fed = tiny_run(tmp_path, "fed.rounds=1", "fed.aggregator='flora'")
    deltas = load_file(str(fed.store.checkpoint(1) / "base_delta.safetensors"))
    assert deltas and all(d.dtype == torch.float32 for d in deltas.values())


# --- environments -----------------------------------------------------------------------------

ADVERSARIAL = [
    "",
    "[" * 200_000,
    "Action: click[" + "[" * 200_000,
    "Action: search[" + "]" * 100_000,
    "Action: get " + "9" * 5000 + " oak planks",
    "Action: craft " + "9" * 5000 + " oak planks using " + "9" * 5000 + " oak logs",
    "Action: " + "a" * 1_000_000,
    "Action: \x00\x01\ud800" * 1000,
    "Action: move forward\n" * 20_000,
    "Thought: " + "é" * 100_000,
]


@pytest.mark.parametrize("env_name", ["babyai", "maze", "wordle", "textcraft", "webshop"])
def test_adversarial_actions_take_little_time_and_never_raise(env_name):
    env = make_env(env_name)
    slowest = 0.0
    for text in ADVERSARIAL:
        env.reset(env.splits["test"][0])
        start = time.perf_counter()
        result = env.step(text)
        slowest = max(slowest, time.perf_counter() - start)
        assert isinstance(result.observation, str)
    assert slowest < 2.0, f"{env_name}: slowest step {slowest:.2f} s"


def test_an_environment_that_raises_ends_only_its_own_episode(tiny_policy):
    from fedse.agent.rollout import RolloutRequest, Sampling, rollout
    from fedse.envs.maze import MazeEnv

    class BrokenMaze(MazeEnv):
        def step(self, model_output):
            raise RuntimeError("the environment's own bug")

    sampling = Sampling(temperature=1.0, max_new_tokens=4)
    envs = {0: "maze", 1: BrokenMaze, 2: "maze"}
    requests = [RolloutRequest(envs[task], task, seed=task, sampling=sampling, max_turns=3) for task in (0, 1, 2)]
    played = rollout(tiny_policy, requests)
    assert [t.finish for t in played].count("env_error") == 1
    broken = next(t for t in played if t.task_id == 1)
    assert broken.finish == "env_error" and not broken.success and broken.turns == 1
    assert all(t.turns == 3 or t.finish == "done" for t in played if t.task_id != 1)


# --- soak -------------------------------------------------------------------------------------


def resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def folder_bytes(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in path.rglob(pattern) if p.is_file())


def test_soak_many_rounds_keep_memory_files_and_disk_flat(tmp_path):
    rounds = 24
    config = tiny_config(f"fed.rounds={rounds}", "checkpoints.keep_last=2", "eval.every=4", "fed.aggregator='fedex'")
    fed = Federation(config, tmp_path / "soak", Policy(load_base("tiny-random")))
    rss, fds, checkpoints, total = [], [], [], []
    for records in fed.rounds():
        rss.append(resident_bytes())
        fds.append(len(os.listdir("/proc/self/fd")))
        checkpoints.append(folder_bytes(fed.store.root / "checkpoints"))
        total.append(folder_bytes(fed.store.root))
        assert records.round == len(rss) - 1
    settled = slice(4, None)  # allocator and caches warm up in the first rounds
    assert max(rss[settled]) - min(rss[settled]) < 64 * 2**20, [r // 2**20 for r in rss]
    assert max(fds[settled]) == min(fds[settled]), fds
    assert max(checkpoints[settled]) == min(checkpoints[settled]), checkpoints
    per_round = (total[-1] - total[4]) / (rounds - 4)  # only the records and buffers grow, by their lines
    assert per_round < 64 * 1024, per_round
    assert fed.store.completed_rounds() == [rounds - 1, rounds]


def test_unknown_checkpoint_round_is_a_one_line_error(tmp_path):
    fed = tiny_run(tmp_path, "fed.rounds=1")
    with pytest.raises(UserError, match="no checkpoint for round 7"):
        fed.store.load_checkpoint(7)
    with pytest.raises(ConfigError):
        load_config(None, ["checkpoints.keep_last=-1"])


# --- corruption of every persisted file -------------------------------------------------------


def corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flipped":
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1 :])
    elif how == "empty":
        path.write_bytes(b"")
    else:  # a well-formed file of the wrong shape
        path.write_text('["not", "what", "fedse wrote"]\n' if path.suffix in (".json", ".jsonl") else "[]")


def resume_outcome(root: Path, capsys) -> tuple[int, str, dict | None]:
    rc = main(["run", "--resume", str(root), "--set", "fed.rounds=2", "--change-config"])
    err = capsys.readouterr().err
    if rc != 0:
        return rc, err, None
    metrics = [
        {k: v for k, v in json.loads(line).items() if k not in ("seconds", "train_seconds")}
        for line in (root / "metrics.jsonl").read_text().splitlines()
    ]
    buffers = {p.parent.name: p.read_text() for p in sorted(root.glob("clients/*/buffer.jsonl"))}
    return (
        rc,
        err,
        {"state": json.loads((root / "state.json").read_text())["global_adapter"], "m": metrics, "b": buffers},
    )


@pytest.fixture(scope="module")
def one_round_runs(tmp_path_factory):
    """Two 1-round runs that between them write every kind of file: fedex (a base delta) and
    fedsa with FedAdam (personal adapters, optimiser moments)."""
    root = tmp_path_factory.mktemp("corruption")
    runs = {}
    for name, extra in {
        "fedex": ["fed.aggregator='fedex'"],
        "fedsa": ["fed.aggregator='fedsa'", "fed.server_optimizer='adam'", "fed.server_lr=0.003"],
    }.items():
        fed = Federation(tiny_config("fed.rounds=1", *extra), root / name, Policy(load_base("tiny-random")))
        fed.run()
        (fed.store.root / ".lock").unlink()
        runs[name] = fed.store.root
    return runs


def persisted_files(root: Path) -> list[str]:
    skip = ("round_000", ".lock", ".png", "report.md")
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not any(s in str(p) for s in skip)
    )


@pytest.mark.parametrize("run", ["fedex", "fedsa"])
def test_every_persisted_file_corrupted_any_way_is_a_one_line_error_or_changes_nothing(
    tmp_path, capsys, one_round_runs, run
):
    import shutil

    pristine = tmp_path / "pristine"
    shutil.copytree(one_round_runs[run], pristine)
    rc, err, expected = resume_outcome(pristine, capsys)
    assert rc == 0, err
    files = persisted_files(one_round_runs[run])
    assert {"state.json", "metrics.jsonl", "config.json", "checkpoints/round_001/aggregator.json"} <= set(files)
    silent, loud = [], []
    for name in files:
        for how in ("truncated", "flipped", "empty", "wrong type"):
            copy = tmp_path / f"{name.replace('/', '_')}-{how}"
            shutil.copytree(one_round_runs[run], copy)
            corrupt(copy / name, how)
            try:
                rc, err, got = resume_outcome(copy, capsys)
            except Exception as error:  # an escaped exception is what this test looks for
                rc, err, got = -1, f"{type(error).__name__}: {error}", None
            if rc == 0 and got != expected:
                silent.append(f"{name} {how}")
            elif rc != 0 and not (rc == 2 and err.count("\n") == 1):
                loud.append(f"{name} {how}: {err[:200]}")
            shutil.rmtree(copy)
    assert (silent, loud) == ([], []), "\n".join(silent + loud)


@pytest.mark.parametrize("how", ["files is a list", "digest not hex", "string round in metrics"])
def test_state_of_the_wrong_shape_and_a_mistyped_round_are_one_line_errors(tmp_path, capsys, one_round_runs, how):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(one_round_runs["fedex"], copy)
    state = json.loads((copy / "state.json").read_text())
    if how == "files is a list":
        state["files"] = list(state["files"])
    elif how == "digest not hex":
        name = next(iter(state["files"]))
        state["files"][name] = "12:not-hex"
    if how == "string round in metrics":
        with (copy / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"event": "explore", "schema": 1, "round": "2"}) + "\n")
    else:
        (copy / "state.json").write_text(json.dumps(state))
    rc, err, _ = resume_outcome(copy, capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert ("metrics.jsonl" in err and "not an integer" in err) if "metrics" in how else "state.json is corrupt" in err


def test_seed_records_no_round_can_train_on_are_left_out_and_the_run_resumes(tmp_path, caplog):
    """A seed whose first turn alone overflows train.max_length, one whose agent turns are all
    marked not to train, and a max_length shorter than the instruction: each used to crash round 1
    again on every resume. Now they are left out with a warning and the run goes on."""
    from fedse.evolve.agenttraj import to_agenttraj
    from fedse.evolve.experts import expert_trajectory
    from helpers import tiny_config

    normal, huge, silent = (to_agenttraj(expert_trajectory("maze", i)) for i in (13, 14, 15))
    huge["conversations"][2]["value"] = "wall " * 3000  # the first observation: far over max_length
    for turn in silent["conversations"][2:]:
        if turn["from"] == "gpt":
            turn["loss"] = False
    path = tmp_path / "seeds.json"
    path.write_text(json.dumps([normal, huge, silent]))
    sets = ["fed.clients=['maze']", "buffer.expert_seeds=0", f"buffer.seed_file='{path}'", "explore.tasks=0"]
    for max_length, trained in ((512, True), (64, False)):
        config = tiny_config(*sets, f"train.max_length={max_length}", "fed.rounds=1")
        root = tmp_path / f"run{max_length}"
        Federation(config, root, Policy(load_base("tiny-random"))).run()
        longer = config.model_copy(update={"fed": config.fed.model_copy(update={"rounds": 2})})
        Federation(longer, root, Policy(load_base("tiny-random"))).run(resume=True, change_config=True)
        clients = [json.loads(x) for x in (root / "metrics.jsonl").read_text().splitlines() if '"client"' in x]
        assert [c["round"] for c in clients] == [1, 2]
        assert all((c["train_tokens"] > 0) == trained for c in clients)
    assert "left out of training" in caplog.text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[{"item_id": "lmrlgym_maze_13", "success": "no", "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}]', "'success' must be true, false, 1 or 0"),
        (None, "not a regular file"),
    ],
)  # fmt: skip
def test_a_seed_file_that_would_read_wrong_or_forever_is_one_line(tmp_path, capsys, content, message):
    path = Path("/dev/zero") if content is None else tmp_path / "seeds.json"
    if content is not None:
        path.write_text(content)
    runs = tmp_path / "runs"
    args = ["run", "--runs-dir", str(runs), "--set", "model.name='tiny-random'", "--set", f"buffer.seed_file='{path}'"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and not runs.exists()


@pytest.mark.parametrize(
    ("event", "field", "value", "message"),
    [
        ("aggregate", "accepted", "maze", 'accepted = "maze" is not list[str]'),  # once counted as 4 clients
        ("aggregate", "accepted", ["maze", 3], 'accepted = ["maze", 3] is not list[str]'),
        ("eval", "task_successes", [1, "yes"], 'task_successes = [1, "yes"] is not list[int]'),
        ("aggregate", "update_cosine", [[1.0, "x"]], 'update_cosine = [[1.0, "x"]] is not list[list[float]] | None'),
    ],
)
def test_a_metrics_field_of_the_wrong_type_is_one_line_not_a_wrong_figure(
    tmp_path, capsys, one_round_runs, event, field, value, message
):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(one_round_runs["fedex"], run)
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    where = next(i for i, line in enumerate(lines) if f'"event": "{event}"' in line)
    record = json.loads(lines[where])
    record[field] = value
    lines[where] = json.dumps(record)
    metrics.write_text("\n".join(lines) + "\n")
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "model.name='" + "m" * 256 + "'"], "is not a model fedse can load offline"),
        (["--runs-dir", "FILE"], "Not a directory"),
    ],
)
def test_impossible_names_and_paths_are_one_line(tmp_path, capsys, args, message):
    (tmp_path / "FILE").write_text("a file, not a folder")
    args = [a.replace("FILE", str(tmp_path / "FILE")) for a in args]
    assert main(["run", *(["--runs-dir", str(tmp_path / "runs")] if "--runs-dir" not in args else []), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


@pytest.mark.parametrize(("raised", "code", "message"), [
    (KeyboardInterrupt(), 130, "interrupted; a run continues from its last completed round with --resume"),
    (OSError(28, "No space left on device", "/runs/x/metrics.jsonl"), 2, "No space left on device (/runs/x/metrics.jsonl)"),
])  # fmt: skip
def test_ctrl_c_and_a_full_disk_end_a_run_with_one_line(tmp_path, capsys, monkeypatch, raised, code, message):
    def stopped(*args, **kwargs):
        raise raised

    monkeypatch.setattr(Federation, "run", stopped)
    assert main(["run", "--runs-dir", str(tmp_path / "runs"), *[f"--set={s}" for s in TINY]]) == code
    err = capsys.readouterr().err.strip()
    assert err.endswith(message) and "\n" not in err


def test_the_final_report_is_written_while_the_run_is_still_locked(tmp_path, monkeypatch):
    import fedse.experiments.report as report
    from fedse.experiments.store import RunStore

    seen = []

    def written_under_lock(run_dirs, out=None):
        try:
            with RunStore(run_dirs[0]).lock():
                seen.append("free")
        except UserError:
            seen.append("locked")
        return Path(run_dirs[0]) / "report.md"

    monkeypatch.setattr(report, "write_report", written_under_lock)
    assert main(["run", "--runs-dir", str(tmp_path / "runs"), *[f"--set={s}" for s in TINY], "--set=fed.rounds=1"]) == 0
    assert seen == ["locked"]


def test_every_new_folder_is_fsynced_in_its_parent(tmp_path, monkeypatch):
    import fedse.files as files

    synced = []
    real = files._fsync_dir
    monkeypatch.setattr(files, "_fsync_dir", lambda d: (synced.append(Path(d)), real(d)))
    files.atomic_write_text(tmp_path / "a" / "b" / "c.json", "{}")
    assert {tmp_path, tmp_path / "a", tmp_path / "a" / "b"} <= set(synced)
    synced.clear()
    files.append_lines(tmp_path / "x" / "m.jsonl", ["{}"])
    assert {tmp_path, tmp_path / "x"} <= set(synced)
