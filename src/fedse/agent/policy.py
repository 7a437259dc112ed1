"""A policy: one frozen base model with any number of named LoRA adapters attached (PEFT).

Rows of one forward pass may each use a different adapter (PEFT's mixed-adapter batches);
`None` means the bare base model.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

from fedse.agent.lora import Adapter, LoraSpec, adapter_hash
from fedse.agent.model import BaseModel

BASE = "__base__"  # PEFT's name for "no adapter" in mixed batches


class Policy:
    def __init__(self, base: BaseModel) -> None:
        self.base = base
        self.tokenizer = base.tokenizer
        self.peft: PeftModel | None = None
        self.specs: dict[str, LoraSpec] = {}
        self.hashes: dict[str, str] = {}
        self._merged: str | None = None

    @property
    def model(self) -> torch.nn.Module:
        return self.peft if self.peft is not None else self.base.model

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def adapter_names(self) -> list[str]:
        return list(self.specs)

    def _ensure_slot(self, name: str, spec: LoraSpec) -> None:
        if name == BASE:
            raise ValueError(f"{BASE!r} is reserved for the bare base model")
        if name in self.specs:
            if self.specs[name] != spec:
                raise ValueError(f"adapter {name!r} exists with {self.specs[name]}, cannot load one with {spec}")
            return
        if self.peft is None:
            self.peft = get_peft_model(self.base.model, spec.peft_config(), adapter_name=name)
        else:
            self.peft.add_adapter(name, spec.peft_config())
        self.peft.eval()
        for p in self.peft.parameters():
            p.requires_grad_(False)
        self.specs[name] = spec

    def new_adapter(self, name: str, spec: LoraSpec, seed: int = 0) -> Adapter:
        """A freshly initialised adapter (PEFT's init: B = 0, so it starts as the base model)."""
        if name in self.specs:
            raise ValueError(f"adapter {name!r} already exists")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self._ensure_slot(name, spec)
        adapter = self.get(name)
        self.hashes[name] = adapter.hash
        return adapter

    def load(self, name: str, adapter: Adapter) -> None:
        """Attach `adapter` under `name`, replacing its tensors if the slot exists."""
        self._ensure_slot(name, adapter.spec)
        expected = set(get_peft_model_state_dict(self.peft, adapter_name=name))
        if set(adapter.tensors) != expected:
            missing, extra = sorted(expected - set(adapter.tensors)), sorted(set(adapter.tensors) - expected)
            raise ValueError(f"adapter {name!r} does not fit this model: missing {missing[:3]}, unexpected {extra[:3]}")
        # LoRA factors keep their own precision (fp32) even on a bf16 base; loading casts into them.
        tensors = {k: v.to(self.device) for k, v in adapter.tensors.items()}
        set_peft_model_state_dict(self.peft, tensors, adapter_name=name)
        self.hashes[name] = adapter_hash(adapter.tensors)

    def get(self, name: str) -> Adapter:
        """The adapter's current tensors (copied to CPU)."""
        if name not in self.specs:
            raise KeyError(f"no adapter named {name!r}; loaded: {self.adapter_names}")
        state = get_peft_model_state_dict(self.peft, adapter_name=name)
        return Adapter(self.specs[name], {k: v.detach().to("cpu").clone() for k, v in state.items()})

    def hash_of(self, name: str | None) -> str | None:
        return None if name is None else self.hashes[name]

    def rehash(self, name: str) -> str:
        """Record the hash of adapter `name` after its tensors changed in place (training)."""
        self.hashes[name] = self.get(name).hash
        return self.hashes[name]

    def activate(self, name: str) -> None:
        """Make `name` the active adapter, all parameters frozen (PEFT's set_adapter unfreezes it)."""
        if self.peft.active_adapter != name:
            self.peft.set_adapter(name)
            for p in self.peft.parameters():
                p.requires_grad_(False)

    @contextmanager
    def attention(self, implementation: str):
        config = self.base.model.config
        previous = config._attn_implementation
        config._attn_implementation = implementation
        try:
            yield
        finally:
            config._attn_implementation = previous

    @contextmanager
    def merged(self, name: str):
        """Fold adapter `name` into the base weights for the duration of the context.

        W' = W + (alpha/r) B A per adapted module. It removes LoRA's two extra matmuls and
        module calls per layer from every decode step. The original weight tensors are put
        back on exit (not un-merged by subtraction), so the base is restored bit for bit.
        Inside, `forward` accepts only rows of `name` or of adapters with the same tensors (hash).
        """
        originals = []
        self._merged = name
        try:
            for module in self.peft.modules():
                if hasattr(module, "get_delta_weight") and name in getattr(module, "lora_A", {}):
                    weight = module.base_layer.weight
                    originals.append((weight, weight.data))
                    weight.data = weight.data + module.get_delta_weight(name).to(weight.dtype)
            with self.peft.disable_adapter():
                yield
        finally:
            self._merged = None
            for weight, data in originals:
                weight.data = data

    def forward(self, adapters: list[str | None], **inputs) -> torch.Tensor:
        """Logits of one forward pass in which row i uses adapter `adapters[i]`."""
        names = set(adapters)
        if self._merged is not None:
            same = {n for n in names if n is not None and self.hashes.get(n) == self.hashes[self._merged]}
            if same != names:
                raise ValueError(f"adapter {self._merged!r} is merged; cannot run rows with {sorted(map(str, names))}")
            return self.peft(**inputs).logits
        if self.peft is None or names == {None}:
            if self.peft is None:
                return self.base.model(**inputs).logits
            with self.peft.disable_adapter():
                return self.peft(**inputs).logits
        if len(names) == 1:
            self.activate(next(iter(names)))
            return self.peft(**inputs).logits
        return self.peft(**inputs, adapter_names=[a or BASE for a in adapters]).logits


def module_weights(policy: Policy) -> dict[str, torch.nn.Parameter]:
    """The frozen base weight of every LoRA-adapted module, by the module's adapter-key prefix."""
    out = {}
    for name, module in policy.peft.named_modules():
        base = getattr(module, "base_layer", None)
        if base is not None and hasattr(base, "weight") and hasattr(module, "lora_A"):
            out[name] = base.weight
    return out
