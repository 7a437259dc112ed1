"""LoRA adapters as plain data: a spec, a state dict, a content hash; saved in PEFT's format.

An `Adapter` is what crosses the client/server boundary: tensor name -> tensor (PEFT's
names, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`) plus the
spec it was made with. On disk it is `adapter_model.safetensors` + `adapter_config.json`,
which PEFT, transformers and vLLM load as they are.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file


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
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def clone(self) -> Adapter:
        return Adapter(self.spec, {k: v.detach().clone() for k, v in self.tensors.items()})


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
