"""LoRA adapters as plain data: a spec, a state dict, a content hash; saved in PEFT's format.

An `Adapter` is what crosses the client/server boundary: tensor name -> tensor (PEFT's
names, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`) plus the
spec it was made with. On disk it is `adapter_model.safetensors` + `adapter_config.json`,
which PEFT, transformers and vLLM load as they are.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"
"""How PEFT names a module's two factors: `<module>.lora_A.weight` (r x in), `<module>.lora_B.weight` (out x r)."""


@dataclass(frozen=True)
class LoraSpec:
    """LoRA hyper-parameters (Fed-SE: rank 8, alpha 16, all linear layers)."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = "all-linear"

    def peft_config(self) -> LoraConfig:
        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        return LoraConfig(
            r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets, task_type="CAUSAL_LM"
        )


def check_target_modules(model: torch.nn.Module, targets: str | tuple[str, ...] | list[str]) -> None:
    """Raise ValueError naming the layers the model has if a target matches no linear layer
    (PEFT matches a name against the end of each module's dotted name)."""
    if isinstance(targets, str):
        return  # "all-linear": PEFT resolves it
    linear = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    leaves = sorted({name.rsplit(".", 1)[-1] for name in linear})
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linear)]
    if missing:
        raise ValueError(
            f"target module {missing[0]!r} is not a linear layer of this model; its linear layers are: "
            + ", ".join(leaves)
        )


def adapter_hash(tensors: dict[str, torch.Tensor]) -> str:
    """12 hex digits of SHA-256 over the sorted names, dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:12]


@dataclass
class Adapter:
    spec: LoraSpec
    tensors: dict[str, torch.Tensor] = field(repr=False)

    @property
    def hash(self) -> str:
        return adapter_hash(self.tensors)

    @property
    def num_bytes(self) -> int:
        return tensor_bytes(self.tensors)

    @property
    def scale(self) -> float:
        """LoRA's s = alpha / r: the weight update is s · B A."""
        return self.spec.alpha / self.spec.rank

    def clone(self) -> Adapter:
        return Adapter(self.spec, {k: v.detach().clone() for k, v in self.tensors.items()})


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes the tensors occupy (and take on the wire)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def lora_modules(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The adapted modules' name prefixes, in sorted order."""
    return sorted(k[: -len(A_SUFFIX)] for k in tensors if k.endswith(A_SUFFIX))


def factor_keys(tensors: dict[str, torch.Tensor], factors: str) -> list[str]:
    """The tensor names of the given factors ('A', 'B' or 'AB'), in the order of `tensors`."""
    suffixes = tuple(s for f, s in (("A", A_SUFFIX), ("B", B_SUFFIX)) if f in factors)
    return [k for k in tensors if k.endswith(suffixes)]


def delta_weight(tensors: dict[str, torch.Tensor], module: str, scale: float) -> torch.Tensor:
    """ΔW = s · B A of one adapted module (float64, dense: out x in)."""
    return scale * tensors[module + B_SUFFIX].double() @ tensors[module + A_SUFFIX].double()


def delta_weights(tensors: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """ΔW = s · B A for every adapted module (float64). Dense: as large as the adapted base weights
    in float64, so loop over `delta_weight` instead where only per-module figures are needed."""
    return {m: delta_weight(tensors, m, scale) for m in lora_modules(tensors)}


def mean_delta(tensor_sets: list[dict[str, torch.Tensor]], scale: float) -> dict[str, torch.Tensor]:
    """mean_k s · B_k A_k per module (the exact FedAvg of the products), built one module at a
    time, so that no client's whole dense update is held at once."""
    return {
        m: sum(delta_weight(t, m, scale) for t in tensor_sets) / len(tensor_sets) for m in lora_modules(tensor_sets[0])
    }


def fresh_adapter(like: Adapter, seed: int) -> Adapter:
    """PEFT's LoRA init with a seeded generator: A ~ kaiming-uniform(a=√5), B = 0.

    Drawn in sorted name order: an adapter read back from a file (safetensors sorts its names)
    and the same adapter in memory must get the same draws (the crash matrix caught FLoRA
    resuming to a different adapter when this followed the dict's order)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for k in sorted(like.tensors):
        v = like.tensors[k]
        if k.endswith(A_SUFFIX):
            bound = 1 / math.sqrt(v.shape[1])  # kaiming_uniform with a=sqrt(5) gives 1/sqrt(fan_in)
            tensors[k] = (torch.rand(v.shape, generator=gen, dtype=torch.float64) * 2 - 1).mul(bound).to(v.dtype)
        else:
            tensors[k] = torch.zeros_like(v)
    return Adapter(like.spec, tensors)


def save_adapter(adapter: Adapter, directory: str | Path, base_model: str | None = None) -> Path:
    """Write PEFT's adapter files into `directory` (created if needed)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = adapter.spec.peft_config()
    config.base_model_name_or_path = base_model
    config.save_pretrained(str(directory))
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter.tensors.items()}
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    return directory


def load_adapter(directory: str | Path) -> Adapter:
    directory = Path(directory)
    config_path, weights_path = directory / "adapter_config.json", directory / "adapter_model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise FileNotFoundError(
            f"{directory} is not a PEFT adapter directory (needs {config_path.name} and {weights_path.name})"
        )
    config = json.loads(config_path.read_text())
    targets = config["target_modules"]
    if isinstance(targets, list):
        targets = tuple(sorted(targets))
    spec = LoraSpec(config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0), targets)
    return Adapter(spec, load_file(str(weights_path)))
