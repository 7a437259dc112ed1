"""What travels in a Flower message, and how many bytes it takes.

Tensors go as a Flower `ArrayRecord` (float32 stays float32, so a round trip is bit-exact);
scalars as a `MetricRecord`; the run configuration and evaluation outcomes as JSON in a
`ConfigRecord`. `wire_bytes` is the size of a message as Flower serialises it: the sum of
every object of its tree (message, records, arrays, array chunks) as `deflate` writes it.

`pack` / `unpack` frame a message's records for the node's local worker socket
(`fedse.flower.worker`): a JSON header naming each record and its kind, then each record's
payload (safetensors for an ArrayRecord, JSON otherwise), with numpy only.
"""

from __future__ import annotations

import json
import struct

from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as save_arrays

# torch is imported where tensors are made: the ClientApp process that only forwards a message to
# the node's worker (fedse.flower.worker) starts sooner without it, on every message
# (results/measurements.md).


def tensors_record(tensors: dict) -> ArrayRecord:
    """torch tensors -> ArrayRecord; numpy (Flower's array format) holds no bfloat16."""
    import torch

    allowed = (torch.float32, torch.float64, torch.float16, torch.int64, torch.int32)
    bad = [k for k, t in tensors.items() if t.dtype not in allowed]
    if bad:
        raise TypeError(f"tensors {bad[:3]} have a dtype Flower cannot carry ({tensors[bad[0]].dtype})")
    return ArrayRecord({k: t.detach().to("cpu").contiguous() for k, t in tensors.items()})


def record_tensors(record: ArrayRecord) -> dict:
    """The tensors of an `ArrayRecord`, in its key order, as writable torch tensors."""
    import torch

    return {k: torch.from_numpy(a.numpy().copy()) for k, a in record.items()}


def json_record(value: object) -> ConfigRecord:
    return ConfigRecord({"json": json.dumps(value)})


def record_json(record: ConfigRecord) -> object:
    return json.loads(record["json"])


def wire_bytes(obj) -> int:
    """Bytes of `obj` (a Message or any record) as Flower serialises it: every distinct object of
    its tree once (Flower sends an object id once, so equal chunks count once, as on the wire)."""
    seen: set[str] = set()

    def walk(o) -> int:
        total = len(o.deflate())
        for object_id, child in (o.children or {}).items():
            if object_id not in seen:
                seen.add(object_id)
                total += walk(child)
        return total

    return walk(obj)


def pack(content: RecordDict) -> bytes:
    """Records -> bytes, with numpy and safetensors only (no torch in the forwarding process)."""
    header, payloads = [], []
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            arrays = {k: a.numpy() for k, a in record.items()}
            data, kind, order = save_arrays(arrays) if arrays else b"", "arrays", list(arrays)
        elif isinstance(record, MetricRecord):
            data, kind, order = json.dumps(dict(record)).encode(), "metrics", []
        else:
            data, kind, order = json.dumps(dict(record)).encode(), "config", []
        header.append({"name": name, "kind": kind, "size": len(data), "order": order})
        payloads.append(data)
    head = json.dumps(header).encode()
    return struct.pack("!Q", len(head)) + head + b"".join(payloads)


def unpack(data: bytes) -> RecordDict:
    (size,) = struct.unpack("!Q", data[:8])
    header, at = json.loads(data[8 : 8 + size]), 8 + size
    out = RecordDict()
    for entry in header:
        payload, at = data[at : at + entry["size"]], at + entry["size"]
        if entry["kind"] == "arrays":
            arrays = load_arrays(payload) if payload else {}
            out[entry["name"]] = ArrayRecord({k: Array(arrays[k]) for k in entry["order"]})
        elif entry["kind"] == "metrics":
            out[entry["name"]] = MetricRecord(json.loads(payload))
        else:
            out[entry["name"]] = ConfigRecord(json.loads(payload))
    return out
