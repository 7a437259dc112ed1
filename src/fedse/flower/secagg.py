"""Secure aggregation of a round's updates with Flower's SecAgg+ (`[privacy] secagg = true`).

SecAgg+ (Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS
2020): each client quantises what it uploads, adds a private mask and pairwise masks agreed with
its neighbours, and sends only that. The pairwise masks cancel in the sum; the private masks, and
the pairwise masks of a client that dropped out, are removed with secret shares its neighbours
hold (a threshold of them must answer). The server learns the sum, and nothing about one client's
update beyond what the sum reveals.

fedse runs Flower's own implementation: `SecAggPlusWorkflow` on the server, `secaggplus_mod` on
the node. A round then goes

1. a `train` message as always, whose config says `secagg`: the node trains, bounds its update by
   the run's norm bound as the server would, keeps what it uploads on its own disk (`keep_upload`)
   and replies with its scalar metrics only;
2. the four SecAgg+ stages, also `train` messages; in the third the node's mod asks the app for the
   kept upload (`masked_reply_content`) and masks it;
3. the server unmasks the mean of the uploads (`secure_mean`), which `FlowerTransport` hands to the
   federation as one update on behalf of every client in it (`Update.members`).

The rule must need only the unweighted mean of what clients upload (`secagg_refusal`). Each entry
is clipped to ±`privacy.secagg_range` and stochastically rounded to 2²² levels, so the mean
is the plain mean to within 2·range/2²² per entry, and differs between two runs by less than that
(Flower's rounding draws from numpy's global generator). A node whose upload has an entry beyond
the range does not send it: it drops out of the round with that reason, as it would on an error.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat
from flwr.server.compat import LegacyContext
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from safetensors.numpy import load_file, save_file

if TYPE_CHECKING:  # torch is not loaded in a ClientApp process that only relays messages
    import torch


PENDING = "secagg"
"""The node folder's subfolder holding the upload it keeps for the masking stage, one file a round."""
SHARES = 1.0
"""Every client shares its secrets with every other (SecAgg+'s neighbourhood is the whole round)."""
THRESHOLD = 0.5
"""Half of a client's shares recover its masks, so the round survives up to half its clients dropping."""


def pending_file(directory: Path, round_: int) -> Path:
    return directory / PENDING / f"round_{round_:03d}.safetensors"


# --- the node ---------------------------------------------------------------------------------------


def keep_upload(directory: Path, round_: int, tensors: dict[str, torch.Tensor], value_range: float) -> None:
    """Keep the round's upload on the node for the masking stage; refuse one that cannot be quantised
    without being clipped (SecAgg+ would clip it silently)."""
    largest = max((float(t.abs().max()) for t in tensors.values()), default=0.0)
    if not math.isfinite(largest) or largest > value_range:
        raise ValueError(
            f"an entry of this client's update is {largest:.4g}, beyond privacy.secagg_range = {value_range:g}: "
            "raise secagg_range (coarser quantisation) or lower the norm bound"
        )
    path = pending_file(directory, round_)
    path.parent.mkdir(parents=True, exist_ok=True)
    for old in path.parent.glob("round_*.safetensors"):
        old.unlink()  # one pending upload at a time: earlier rounds' are spent
    tmp = path.with_suffix(".tmp")
    save_file({k: t.detach().double().numpy() for k, t in tensors.items()}, str(tmp))
    tmp.replace(path)


def masked_reply_content(directory: Path, round_: int) -> RecordDict:
    """The reply the SecAgg+ mod masks: the kept upload in key order, weight 1 (an unweighted mean)."""
    path = pending_file(directory, round_)
    if not path.exists():
        raise ValueError(f"no update kept for round {round_} on this node: it did not train that round")
    kept = load_file(str(path))
    parameters = ndarrays_to_parameters([kept[k] for k in sorted(kept)])
    return compat.fitres_to_recorddict(FitRes(Status(Code.OK, ""), parameters, 1, {}), keep_input=False)


def secagg_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's SecAgg+ client mod for the protocol's messages; every other message passes through."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def masking_request(content: RecordDict) -> dict | None:
    """The fields `secure_mean` sent (round, client, clients, token, node_root) if `content` is SecAgg+'s
    request for the node's kept upload, else None."""
    if "fitins.config" not in content.config_records:
        return None
    return json.loads(str(content.config_records["fitins.config"]["fedse"]))


# --- the server -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Node:
    """What SecAggPlusWorkflow needs of a client proxy."""

    node_id: int


class _MeanOnly:
    """The two strategy calls SecAggPlusWorkflow makes: which nodes take part, with which
    instructions; and the unmasked mean, which it keeps."""

    def __init__(self, instructions: dict[int, dict]) -> None:
        self.instructions = instructions
        self.mean: list[np.ndarray] | None = None
        self.members: list[int] = []

    def configure_fit(self, server_round, parameters, client_manager):
        empty = Parameters([], "")
        return [(_Node(node), FitIns(empty, config)) for node, config in self.instructions.items()]

    def aggregate_fit(self, server_round, results, failures):
        if results:
            self.mean = parameters_to_ndarrays(results[0][1].parameters)  # every result holds the mean
            self.members = [proxy.node_id for proxy, _ in results]
        return None, {}


def secure_mean(
    grid, nodes: dict[str, tuple[int, dict]], like: dict[str, torch.Tensor], value_range: float, timeout: float
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The mean of what the clients of `nodes` (client -> its node and the fields that find its
    kept upload: round, client, clients, token, node_root) kept, unmasked by SecAgg+ over `grid`,
    and the clients it includes, in the order of `nodes` (none: too few took part for the
    protocol to finish). `like` gives the uploaded tensors' keys, shapes and dtypes."""
    instructions = {node: {"fedse": json.dumps(fields)} for node, fields in nodes.values()}
    round_ = int(next(iter(nodes.values()))[1]["round"])
    strategy = _MeanOnly(instructions)
    context = LegacyContext(Context(0, 0, {}, RecordDict(), {}), strategy=strategy)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: round_})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow = SecAggPlusWorkflow(SHARES, THRESHOLD, max_weight=1.0, clipping_range=value_range, timeout=timeout)
    workflow(grid, context)
    if strategy.mean is None:
        return {}, []
    keys = sorted(like)
    if [tuple(a.shape) for a in strategy.mean] != [tuple(like[k].shape) for k in keys]:
        raise ValueError("the securely aggregated vector does not have the shapes of the uploaded factors")
    import torch

    mean = {k: torch.from_numpy(np.asarray(a, dtype=np.float64)).to(like[k].dtype) for k, a in zip(keys, strategy.mean)}
    included = set(strategy.members)
    return mean, [client for client, (node, _) in nodes.items() if node in included]  # in the order of `nodes`
