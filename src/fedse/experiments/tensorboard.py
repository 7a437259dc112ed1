"""A run's metrics as TensorBoard events, written as the run writes its records (`[log]`).

`metrics.jsonl` stays the run's record; this is a view of it for `tensorboard --logdir runs/`,
one step per round: test success per environment and the Avg (`success/*`), each client's
training loss, examples and exploration success (`client/<name>/*`), the server's update norms,
mean pairwise cosine and bytes (`server/*`), and Flower's measured bytes (`wire/*`).
Needs the `tensorboard` extra (`pip install 'fedse[tensorboard]'`).
"""

from __future__ import annotations

from pathlib import Path

from fedse.errors import UserError
from fedse.experiments.records import (
    AggregateRecord,
    ClientRecord,
    EvalAvgRecord,
    EvalRecord,
    ExploreRecord,
    Record,
    WireRecord,
)
from fedse.sections import Section

FOLDER = "tensorboard"
"""Where in the run folder the event files go."""


class LogSection(Section):
    """The `[log]` section: where a run's metrics go besides `metrics.jsonl`."""

    tensorboard: bool = False
    """Write TensorBoard event files into <run>/tensorboard/ during the run."""


def scalars(record: Record) -> dict[str, float]:
    """The TensorBoard scalars (tag -> value) one record contributes at its round."""
    match record:
        case EvalRecord():
            return {f"success/{record.env}": record.success}
        case EvalAvgRecord():
            return {"success/avg": record.avg_weighted, "success/mean_over_envs": record.avg_mean}
        case ClientRecord():
            out = {
                f"client/{record.client}/examples": record.num_examples,
                f"client/{record.client}/explore_success": record.explore_success,
                f"client/{record.client}/buffer": record.buffer,
                f"client/{record.client}/train_seconds": record.train_seconds,
            }
            if record.train_loss is not None:
                out[f"client/{record.client}/train_loss"] = record.train_loss
            return out
        case ExploreRecord():
            return {"explore/episodes": record.episodes, "explore/generated_tokens": record.generated_tokens}
        case AggregateRecord():
            out = {"server/accepted": len(record.accepted), "server/bytes_up": sum(record.bytes_up)}
            out["server/bytes_down"] = record.bytes_down
            for client, norm in zip(record.accepted, record.update_norm or [], strict=False):
                out[f"server/update_norm/{client}"] = norm
            cosine = record.update_cosine or []
            pairs = [cosine[i][j] for i in range(len(cosine)) for j in range(i + 1, len(cosine))]
            if pairs:
                out["server/mean_pairwise_cosine"] = sum(pairs) / len(pairs)
            return out
        case WireRecord():
            return {
                f"wire/{record.phase}/up": sum(record.up.values()),
                f"wire/{record.phase}/down": sum(record.down.values()),
            }
    return {}


class TensorBoardLog:
    """Appends each record's scalars to the event files under `<root>/tensorboard/`."""

    def __init__(self, root: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError(
                "[log] tensorboard = true needs the tensorboard package: pip install 'fedse[tensorboard]' "
                "(or set log.tensorboard = false)"
            ) from None
        self.writer = SummaryWriter(log_dir=str(Path(root) / FOLDER))

    def __call__(self, records: tuple[Record, ...]) -> None:
        for record in records:
            for tag, value in scalars(record).items():
                self.writer.add_scalar(tag, float(value), record.round)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
