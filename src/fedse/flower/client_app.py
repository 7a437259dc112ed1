"""fedse's Flower ClientApp: the client round of `fedse.flower.node` behind Flower's Message API.

Three messages, each answered from the node's own files and base model:

- `query`: which client of the run this node is (node config `client`, or in simulation the
  `partition-id`-th client of the run);
- `train`: content `global` (the global adapter), `base` (the cumulative base delta of a
  mutating rule, else empty) and `config` (round, client, run configuration, run token);
  reply `update` (only the factors the rule uploads) and `metrics` (num_examples, the update's
  scalar metrics, the exploration's counts) — nothing else leaves the node;
- `evaluate`: the same content plus the environments to test; reply `eval` (per environment:
  tasks, successes, reward, per-task outcomes).

Node config keys: `client` (e.g. `maze`, or `maze-0` with several clients per environment),
`data-dir` (where the node keeps its buffer and personal adapters; default: the directory the
server names, which only makes sense on one machine), and the node's own environment settings,
known to this node only: `env-config`, `env-class`, `env-url`, `env-timeout`
(`fedse.flower.node_envs`). With `fedse flower node` a long-lived worker holds the base model;
this app then forwards each message to it (see `worker.py`).
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedse.flower.codec import json_record, record_json
from fedse.flower.secagg import masked_reply_content, masking_request, secagg_mod

app = ClientApp(mods=[secagg_mod])


def node_directory(node_config: dict, config: dict) -> Path:
    root = node_config.get("data-dir") or config["node_root"]
    return Path(str(root)).expanduser() / config["token"] / config["client"]


def node_client_name(node_config: dict, clients: list[str]) -> str:
    if "client" in node_config:
        return str(node_config["client"])
    if "partition-id" in node_config:
        return clients[int(node_config["partition-id"]) % len(clients)]
    raise ValueError('this SuperNode has no client: start it with --node-config "client=<env> data-dir=<dir>"')


def handle(message_type: str, content: RecordDict, node_config: dict) -> RecordDict:
    """The reply content to one message (the same in this process and in a worker)."""
    masking = masking_request(content) if message_type == "train" else None  # SecAgg+'s stage 3
    config = masking or record_json(content["config"])
    if message_type == "query":
        return RecordDict({"config": json_record({"client": node_client_name(node_config, config["clients"])})})
    name = node_client_name(node_config, config["clients"])
    if name != config["client"]:
        raise ValueError(f"this node is client {name!r}, the server sent a message for {config['client']!r}")
    if masking is not None:  # the upload kept at training, read from disk: no model needed
        return masked_reply_content(node_directory(node_config, config), int(config["round"]))
    from fedse.flower.node import evaluate_content, train_content  # torch and the model: not for a query
    from fedse.flower.node_envs import NodeEnvs

    directory = node_directory(node_config, config)
    own = NodeEnvs.from_node_config(node_config)
    if message_type == "train":
        return train_content(content, config, directory, own)
    if message_type == "evaluate":
        return evaluate_content(content, config, directory, own)
    raise ValueError(f"unknown message type {message_type!r}")


def _reply(msg: Message, context: Context) -> Message:
    from fedse.flower.worker import forward, worker_socket

    node_config = dict(context.node_config)
    socket_path = worker_socket(node_config)
    if socket_path is not None and masking_request(msg.content) is None:  # SecAgg+ reads a file: no model
        content = forward(socket_path, msg.metadata.message_type, msg.content)
    else:
        content = handle(msg.metadata.message_type, msg.content, node_config)
    return Message(content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    return _reply(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _reply(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _reply(msg, context)
