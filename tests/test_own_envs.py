"""Environments of one's own: named by class in the run configuration or registered by an installed
package's entry point, federated beside the built-in ones, and every mistake one line."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

import fedse.envs
from fedse.agent.model import load_base
from fedse.agent.policy import Policy
from fedse.envs import EnvError, defined_on_its_node, has_expert, list_envs, make_env
from fedse.errors import UserError
from fedse.evolve.agenttraj import to_agenttraj
from fedse.experiments.config import ConfigError, load_config
from fedse.experiments.federation import Federation
from fedse.fl.client import expert_seeds
from fedse.flower.node_envs import NodeEnvs
from helpers import TINY, records, tiny_config


def own_config(tmp_path, table: str, *extra: str):
    path = tmp_path / "own.toml"
    path.write_text(table)
    return load_config(path, [*TINY, *extra])


TICKETS = '[env.tickets]\nclass = "acme_tickets:TicketRouting"\noptions = { tickets = 12 }\n'


def test_an_environment_named_by_class_federates_beside_a_built_in_one(tmp_path):
    config = own_config(tmp_path, TICKETS, "fed.clients=['tickets', 'maze']", "fed.rounds=1")
    assert "tickets" in list_envs() and has_expert("tickets")
    env = make_env("tickets")
    assert env.splits == {"train": (1, 2, 3, 4, 6, 7, 8, 9, 11), "test": (0, 5, 10)}  # its own, with its options
    fed = Federation(config, tmp_path / "run", Policy(load_base("tiny-random")))
    fed.run()
    seeded = [t for _, t in fed.transport.buffer("tickets").entries]
    assert seeded and all(t.env == "tickets" and t.success for t in seeded)  # its expert's demonstrations
    assert {t.task_id for t in seeded} <= set(env.splits["train"])
    evaluated = {r["env"] for r in records(fed.store.root) if r["event"] == "eval"}
    assert evaluated == {"tickets", "maze"}


def test_an_environment_without_an_expert_is_seeded_from_a_file_beside_experts(tmp_path):
    """`quiet` has no expert: its client takes its seeds from an AgentTraj file while maze's
    still gets its expert's demonstrations; with neither file nor exploration it is refused."""
    quiet = '[env.quiet]\nclass = "own_envs:NoExpert"\noptions = { tickets = 12 }\n'
    with pytest.raises(ConfigError, match="'quiet' has no expert, and with no buffer.seed_file and explore.tasks = 0"):
        own_config(tmp_path, quiet, "fed.clients=['quiet', 'maze']", "explore.tasks=0")
    own_config(tmp_path, TICKETS, "fed.clients=['tickets']")
    demos = [replace(t, env="quiet") for t in expert_seeds("tickets", ["tickets"], 3)]
    seed_file = tmp_path / "quiet.json"
    seed_file.write_text(json.dumps([to_agenttraj(t) for t in demos]))
    config = own_config(
        tmp_path,
        quiet,
        "fed.clients=['quiet', 'maze']",
        "fed.rounds=1",
        "explore.tasks=0",
        f"buffer.seed_file='{seed_file}'",
    )
    assert not has_expert("quiet")
    fed = Federation(config, tmp_path / "run", Policy(load_base("tiny-random")))
    fed.run()
    quiet_seeds = [t for _, t in fed.transport.buffer("quiet").entries]
    assert [t.outputs for t in quiet_seeds] == [t.outputs for t in demos]
    assert len(fed.transport.buffer("maze").entries) == 2  # buffer.expert_seeds of maze's expert
    trained = {r["client"]: r["train_tokens"] for r in records(fed.store.root) if r["event"] == "client"}
    assert trained["quiet"] > 0 and trained["maze"] > 0


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('[env.a]\nclass = "own_envs"\n', "is not 'package.module:ClassName'"),
        ('[env.b]\nclass = "no_such_pkg.envs:X"\n', "cannot import 'no_such_pkg.envs'"),
        ('[env.c]\nclass = "own_envs:Missing"\n', "'own_envs' has no 'Missing'"),
        ('[env.d]\nclass = "own_envs:NotAnEnv"\n', "is not a subclass of fedse.envs.TextEnv"),
        ('[env.e]\nclass = "own_envs:Unfinished"\n', "does not implement act, parse_action, start_task"),
        ('[env.f]\nclass = "acme_tickets:TicketRouting"\noptions = { size = 3 }\n', "cannot build it with its options"),
        (
            '[env.g]\nclass = "acme_tickets:TicketRouting"\noptions = { tickets = 0 }\n',
            "its splits name no train task ids",
        ),
        ('[env.maze]\nclass = "acme_tickets:TicketRouting"\n', "'maze' is built in; give yours another name"),
    ],
)
def test_each_mistake_in_an_own_environment_is_one_line_naming_it(tmp_path, table, message):
    with pytest.raises(ConfigError) as raised:
        own_config(tmp_path, table)
    text = str(raised.value)
    assert message in text and "\n" not in text and f"[env.{table[5]}" in text


def test_split_ids_beyond_the_task_count_are_refused(tmp_path, monkeypatch):
    import acme_tickets

    monkeypatch.setattr(acme_tickets.TicketRouting, "num_tasks", 4)
    with pytest.raises(ConfigError, match=r"train task id 4 is out of range \(0..3\)"):
        own_config(tmp_path, TICKETS.replace("12", "6"))


def test_an_installed_packages_entry_point_registers_its_environment(tmp_path, monkeypatch):
    # what `pip install examples/ticket-routing` leaves for importlib.metadata to find
    dist = tmp_path / "acme_tickets-0.1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-tickets\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text(
        "[fedse.envs]\nrouted = acme_tickets:TicketRouting\nbroken = acme_tickets_missing:Nothing\n"
        "built = own_envs:small_echo\nnot_env = own_envs:not_an_env\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(fedse.envs, "_REGISTERED", {})
    fedse.envs._installed.cache_clear()
    try:
        assert {"routed", "broken"} <= set(list_envs())
        assert make_env("routed").reset(0).startswith("New ticket:")
        with pytest.raises(EnvError, match="'broken': its package's entry point failed to load"):
            make_env("broken")
        config = load_config(None, [*TINY, "fed.clients=['routed', 'maze']"])  # no [env.*] table needed
        assert config.fed.clients == ["routed", "maze"] and has_expert("routed")
        assert make_env("built").splits["test"] == [0, 4] and has_expert("built")  # a function's environment
        with pytest.raises(EnvError, match="'not_env': it built a NotAnEnv, not a fedse.envs.TextEnv"):
            make_env("not_env")
    finally:
        fedse.envs._installed.cache_clear()


def test_the_example_package_federates_with_two_built_in_games(tmp_path):
    example = Path(__file__).resolve().parents[1] / "examples" / "ticket-routing"
    config = load_config(
        example / "federation.toml", [*TINY, "fed.clients=['tickets', 'maze', 'babyai']", "fed.rounds=1"]
    )
    fed = Federation(config, tmp_path / "run", Policy(load_base("tiny-random")))
    fed.run()
    assert {r["env"] for r in records(fed.store.root) if r["event"] == "eval"} == {"tickets", "maze", "babyai"}
    assert make_env("tickets").num_tasks == 300


def test_a_bad_plugin_stops_fedse_run_with_one_line_and_creates_nothing(tmp_path, capsys):
    from fedse.cli import main

    path = tmp_path / "bad.toml"
    path.write_text('[fed]\nclients = ["desk"]\n[env.desk]\nclass = "acme_tickets:Nope"\n')
    assert main(["run", str(path), "--runs-dir", str(tmp_path / "runs"), *[f"--set={s}" for s in TINY]]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "fedse: error: [env.desk]: environment 'desk': 'acme_tickets' has no 'Nope'"
    assert not (tmp_path / "runs").exists()


# --- an environment its Flower node defines: the server's configuration names it only -----------

NODE_ONLY = ["fed.clients=['privdesk', 'maze']", "env.privdesk.backend='node'"]
PRIVDESK = '[env.privdesk]\nclass = "acme_tickets:TicketRouting"\noptions = { tickets = 12 }\n'


def test_a_run_here_refuses_an_environment_only_its_node_defines(tmp_path, capsys):
    from fedse.cli import main

    config = tiny_config(*NODE_ONLY)  # the server validates it: it knows the name, not the class
    assert config.env["privdesk"].backend == "node" and defined_on_its_node("privdesk")
    assert main(["run", "--runs-dir", str(tmp_path / "runs"), *[f"--set={s}" for s in [*TINY, *NODE_ONLY]]]) == 2
    err = capsys.readouterr().err.strip()
    assert "environment 'privdesk' is defined on its Flower node" in err and "fedse flower" in err
    assert "\n" not in err and not (tmp_path / "runs").exists()


def test_a_node_environment_table_takes_no_definition_on_the_server():
    with pytest.raises(ConfigError, match=r"backend = 'node' takes no other key \(class\)"):
        tiny_config(*NODE_ONLY, "env.privdesk.class='acme_tickets:TicketRouting'")


def test_the_nodes_own_table_replaces_the_servers_for_the_environments_it_holds(tmp_path):
    file = tmp_path / "node-env.toml"
    file.write_text(PRIVDESK)
    tree = tiny_config(*NODE_ONLY).model_dump(by_alias=True)
    run = NodeEnvs.from_node_config({"env-config": str(file)}).run_config(tree, "privdesk")
    assert run.env["privdesk"].class_ == "acme_tickets:TicketRouting" and not defined_on_its_node("privdesk")
    assert make_env("privdesk").splits["test"] == (0, 5, 10)
    # the maze node's own address for its (built-in) environment; the run's other tables stay
    run = NodeEnvs.from_node_config({"env-url": "http://10.0.0.5:36001", "env-timeout": 5}).run_config(tree, "maze")
    assert run.env["maze"].url == "http://10.0.0.5:36001" and run.env["maze"].timeout == 5


@pytest.mark.parametrize(
    ("content", "node", "message"),
    [
        ("[env.privdesk\n", "privdesk", "not valid TOML"),
        ("[fed]\nrounds = 3\n", "privdesk", "holds only [env.<name>] tables, found [fed]"),
        (PRIVDESK.replace("privdesk", "other"), "privdesk", "[env.other] is not an environment this node holds"),
        ("", "privdesk", "this node holds it but does not define it: start the node with --env-config"),
        ('[env.privdesk]\nclass = "acme_tickets:Nope"\n', "privdesk", "this node's environments: [env.privdesk]"),
    ],
)
def test_each_mistake_in_a_nodes_environments_is_one_line(tmp_path, content, node, message):
    file = tmp_path / "node-env.toml"
    file.write_text(content)
    tree = tiny_config(*NODE_ONLY).model_dump(by_alias=True)
    node_config = {"env-config": str(file)} if content else {}
    with pytest.raises(UserError) as raised:
        NodeEnvs.from_node_config(node_config).run_config(tree, node)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_an_environment_written_from_scratch_federates_with_its_attributes_set_at_construction(tmp_path):
    config = own_config(tmp_path, '[env.echo]\nclass = "own_envs:Echo"\noptions = { tasks = 16 }\n',
                        "fed.clients=['echo', 'maze']", "fed.rounds=1")  # fmt: skip
    env = make_env("echo")
    assert env.name == "echo" and env.splits["test"] == [0, 4, 8, 12] and has_expert("echo")
    fed = Federation(config, tmp_path / "run", Policy(load_base("tiny-random")))
    fed.run()
    seeded = [t for _, t in fed.transport.buffer("echo").entries]
    assert len(seeded) == 2 and all(t.success and t.env == "echo" for t in seeded)
    evaluated = {r["env"]: r["tasks"] for r in records(fed.store.root) if r["event"] == "eval"}
    assert evaluated == {"echo": 2, "maze": 2}


def test_an_attribute_of_the_wrong_kind_is_one_line(tmp_path):
    with pytest.raises(
        ConfigError, match=r"\[env.turns\]: environment 'turns': max_turns = 0; it must be an integer >= 1"
    ):
        own_config(tmp_path, '[env.turns]\nclass = "own_envs:BadTurns"\n')
