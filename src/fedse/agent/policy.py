"""A policy: one frozen base model with any number of named LoRA adapters attached (PEFT).

`Policy` is the only owner of the model's internals: PEFT, the Hugging Face model object,
its attention implementation, its base weights. Everything else in fedse goes through the
operations here:

- `logits(adapters, input_ids, keep=...)`: one forward in which row i uses adapter
  `adapters[i]` (`None`: the bare base model), with the output layer run only at the
  positions asked for (a fifth of a small model's compute per token; most prompt positions
  need no logits). The rollout engine, the reference loop, training and the tiny test model
  all take this one path;
- `training(name, factors)`: the context in which adapter `name`'s factors are trainable
  (its layers then run `fused_lora_linear`: LoRA's matmuls in the base's dtype, the factors
  and their gradients staying fp32);
- `merged(name)`: adapter `name` folded into the base weights for fast rollouts;
- `set_base_delta(delta)`: base = original + delta, for aggregators that mutate the base.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import Linear as LoraLinear
from transformers import DynamicCache

from fedse.agent.kvcache import RowCache
from fedse.agent.lora import Adapter, LoraSpec, adapter_hash, check_target_modules
from fedse.agent.model import BaseModel


def fusable(module: LoraLinear, name: str) -> bool:
    """Whether `fused_lora_linear` computes what PEFT's forward does for adapter `name` here:
    plain LoRA (no variant such as DoRA, no bias on B), no dropout, not merged."""
    return (
        name in module.lora_A
        and name not in getattr(module, "lora_variant", {})
        and module.lora_B[name].bias is None
        and isinstance(module.lora_dropout[name], torch.nn.Identity)
        and not module.merged
    )


def fused_lora_linear(module: LoraLinear, name: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """y = W x + s · B (A x) for one adapter, as PEFT's LoRA layer computes it, in the input's dtype.

    The scale s = alpha / r multiplies the rank-r intermediate, and the base output is the
    addend of the second GEMM (one `addmm`), so no extra pass touches the full-width output.
    The factors are cast to the input's dtype for the matmuls; they and their gradients stay
    in their own (fp32) precision. Where PEFT would not apply `name` alone (adapters disabled,
    another adapter active, a mixed batch's `adapter_names`), PEFT's own forward runs."""
    if module.disable_adapters or module.active_adapters != [name] or "adapter_names" in kwargs:
        return LoraLinear.forward(module, x, *args, **kwargs)
    base = module.base_layer(x, *args, **kwargs)
    a = module.lora_A[name].weight.to(x.dtype)
    b = module.lora_B[name].weight.to(x.dtype)
    low = torch.nn.functional.linear(x, a) * module.scaling[name]
    out = torch.addmm(base.reshape(-1, base.shape[-1]), low.reshape(-1, low.shape[-1]), b.t())
    return out.view(base.shape)


BASE = "__base__"  # PEFT's name for "no adapter" in mixed batches
DEFAULT_ATTENTION = "sdpa"


class Policy:
    def __init__(self, base: BaseModel) -> None:
        self.base = base
        self.tokenizer = base.tokenizer
        self.specs: dict[str, LoraSpec] = {}
        self.hashes: dict[str, str] = {}
        self._peft: PeftModel | None = None
        self._merged: str | None = None
        self._training: str | None = None
        self._base_original: dict[str, torch.Tensor] = {}
        # The attention the model was loaded with, put back after the engine's (read, never written).
        self._attention = self._hf.config._attn_implementation or DEFAULT_ATTENTION

    # --- what callers may know about the model ----------------------------------------------

    @property
    def _hf(self) -> torch.nn.Module:
        return self.base.model

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def dtype(self) -> torch.dtype:
        return self._hf.dtype

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model's position encoding is configured for (None: unknown)."""
        return getattr(self._hf.config, "max_position_embeddings", None)

    @property
    def query_heads(self) -> int:
        return self._hf.config.num_attention_heads

    @property
    def adapter_names(self) -> list[str]:
        return list(self.specs)

    def new_cache(self, batch: int, capacity: int) -> RowCache:
        """An empty per-row KV cache sized for this model (see `fedse.agent.kvcache`)."""
        return RowCache.for_model(self._hf.config, batch, self.dtype, self.device, capacity=capacity)

    def generation_cache(self):
        """An empty cache of the model's own kind, for token-by-token generation without the engine."""
        return DynamicCache(config=self._hf.config)

    def trainable_parameters(self) -> int:
        """How many parameters currently require gradients (0 outside `training`)."""
        return sum(p.numel() for p in self._hf.parameters() if p.requires_grad)

    # --- adapters ----------------------------------------------------------------------------

    def _ensure_slot(self, name: str, spec: LoraSpec) -> None:
        if name == BASE:
            raise ValueError(f"{BASE!r} is reserved for the bare base model")
        if name in self.specs:
            if self.specs[name] != spec:
                raise ValueError(f"adapter {name!r} exists with {self.specs[name]}, cannot load one with {spec}")
            return
        if self._peft is None:
            self._peft = get_peft_model(self._hf, spec.peft_config(), adapter_name=name)
        else:
            self._peft.add_adapter(name, spec.peft_config())
        self._peft.eval()
        self._freeze()
        self.specs[name] = spec

    def _freeze(self) -> None:
        for p in self._peft.parameters():
            p.requires_grad_(False)

    def check_spec(self, spec: LoraSpec) -> None:
        """ValueError naming the model's linear layers if one of spec's target modules matches none."""
        check_target_modules(self.base.model, spec.target_modules)

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
        expected = set(get_peft_model_state_dict(self._peft, adapter_name=name))
        if set(adapter.tensors) != expected:
            missing, extra = sorted(expected - set(adapter.tensors)), sorted(set(adapter.tensors) - expected)
            raise ValueError(f"adapter {name!r} does not fit this model: missing {missing[:3]}, unexpected {extra[:3]}")
        # LoRA factors keep their own precision (fp32) even on a bf16 base; loading casts into them.
        tensors = {k: v.to(self.device) for k, v in adapter.tensors.items()}
        set_peft_model_state_dict(self._peft, tensors, adapter_name=name)
        self.hashes[name] = adapter_hash(adapter.tensors)

    def get(self, name: str) -> Adapter:
        """The adapter's current tensors (copied to CPU)."""
        if name not in self.specs:
            raise KeyError(f"no adapter named {name!r}; loaded: {self.adapter_names}")
        state = get_peft_model_state_dict(self._peft, adapter_name=name)
        return Adapter(self.specs[name], {k: v.detach().to("cpu").clone() for k, v in state.items()})

    def hash_of(self, name: str | None) -> str | None:
        return None if name is None else self.hashes[name]

    def _activate(self, name: str) -> None:
        """Make `name` the active adapter, all parameters frozen (PEFT's set_adapter unfreezes it)."""
        if self._peft.active_adapter != name:
            self._peft.set_adapter(name)
            self._freeze()

    # --- forward -----------------------------------------------------------------------------

    def logits(
        self, adapters: list[str | None], input_ids: torch.Tensor, *, keep: torch.Tensor | None = None, **inputs
    ) -> torch.Tensor:
        """Logits of one forward pass in which row i uses adapter `adapters[i]`.

        `keep`: a boolean (B, S) mask of the positions whose logits are wanted; the result is
        then (number kept, V), in row-major order. Without it, (B, S, V). Other keyword
        arguments (attention_mask, position_ids, cache, use_cache) go to the model as they are.
        """
        if keep is not None:
            # A 2-D boolean mask makes the model gather the kept hidden states into one
            # contiguous (N, H) matrix before its output layer. On CPU in bf16 a strided 3-D
            # input there takes a batched-matmul path that copies the whole head weight per
            # row, which grows with the rows kept (results/measurements.md).
            inputs["logits_to_keep"] = keep
        inputs["input_ids"] = input_ids
        names = set(adapters)
        if self._merged is not None:
            same = {n for n in names if n is not None and self.hashes.get(n) == self.hashes[self._merged]}
            if same != names:
                raise ValueError(f"adapter {self._merged!r} is merged; cannot run rows with {sorted(map(str, names))}")
            return self._peft(**inputs).logits
        if self._peft is None:
            return self._hf(**inputs).logits
        if names == {None}:
            with self._peft.disable_adapter():
                return self._peft(**inputs).logits
        if len(names) == 1:
            if self._training is None:
                self._activate(next(iter(names)))
            elif names != {self._training}:
                raise ValueError(f"adapter {self._training!r} is training; cannot run rows with {sorted(names)}")
            return self._peft(**inputs).logits
        return self._peft(**inputs, adapter_names=[a or BASE for a in adapters]).logits

    @contextmanager
    def attention(self, implementation: str) -> Iterator[None]:
        """Run the model with another registered attention function (e.g. the rollout engine's)."""
        self._hf.set_attn_implementation(implementation)
        try:
            yield
        finally:
            self._hf.set_attn_implementation(self._attention)

    @contextmanager
    def merged(self, name: str) -> Iterator[None]:
        """Fold adapter `name` into the base weights for the duration of the context.

        W' = W + (alpha/r) B A per adapted module. It removes LoRA's two extra matmuls and
        module calls per layer from every decode step. The original weight tensors are put
        back on exit (not un-merged by subtraction), so the base is restored bit for bit.
        Inside, `logits` accepts only rows of `name` or of adapters with the same tensors (hash).
        """
        originals = []
        self._merged = name
        try:
            for module in self._peft.modules():
                if hasattr(module, "get_delta_weight") and name in getattr(module, "lora_A", {}):
                    weight = module.base_layer.weight
                    originals.append((weight, weight.data))
                    weight.data = weight.data + module.get_delta_weight(name).to(weight.dtype)
            with self._peft.disable_adapter():
                yield
        finally:
            self._merged = None
            for weight, data in originals:
                weight.data = data

    # --- training and base mutation ------------------------------------------------------------

    @contextmanager
    def _fused_lora(self, name: str, active: bool) -> Iterator[None]:
        """Every linear layer adapted by `name` runs `fused_lora_linear` instead of PEFT's forward.

        Why: PEFT computes W x, then B(A x), scales that full-width output and adds it, two
        extra passes over every adapted layer's output forward and backward, and on a bf16 base
        it casts each input to the factors' fp32 and back. Here the scale acts on the rank-r
        intermediate and the sum is the addend of the second GEMM: more tokens/s and less peak
        memory on long episodes (`bench/sft.py` measures it; results/measurements.md).
        tests/test_evolve.py pins the loss, gradients and trained adapters to PEFT's path.
        Layers that `fusable` rejects (DoRA, dropout, a bias on B) keep PEFT's forward.
        """
        patched = []
        if active:
            for module in self._peft.modules():
                if isinstance(module, LoraLinear) and fusable(module, name):
                    module.forward = functools.partial(fused_lora_linear, module, name)
                    patched.append(module)
        try:
            yield
        finally:
            for module in patched:
                del module.forward  # the instance attribute goes; PEFT's method shows again

    @contextmanager
    def training(self, name: str, factors: str = "AB", fused_lora: bool = True) -> Iterator[list[torch.nn.Parameter]]:
        """Adapter `name` active in train mode with its `factors` ('AB', or 'B' for a frozen A)
        trainable; yields those parameters. On exit everything is frozen again, in eval mode,
        and the adapter's hash is updated to its trained tensors. `fused_lora`: see
        `_fused_lora` (False: PEFT's own LoRA forward, the reference)."""
        self._activate(name)
        wanted = tuple(f"lora_{f}.{name}." for f in factors)
        params = []
        for pname, p in self._peft.named_parameters():
            p.requires_grad_(any(w in pname + "." for w in wanted))
            if p.requires_grad:
                params.append(p)
        if not params:
            self._freeze()
            raise ValueError(f"adapter {name!r} has no trainable LoRA factors {factors!r}")
        self._training = name
        self._peft.train()
        try:
            with self._fused_lora(name, fused_lora):
                yield params
        finally:
            self._training = None
            self._peft.eval()
            self._freeze()
            self.hashes[name] = self.get(name).hash

    @contextmanager
    def watching_inputs(self, observe: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
        """Call `observe(module, x)` with the input of every LoRA-adapted linear layer on each
        forward pass inside the context (`module`: the adapter tensors' prefix; `x`: ... x in).
        For measurements that need a layer's activations, e.g. how much one client's update
        moves another's hidden inputs; nothing is kept here."""
        handles = []
        for name, module in self._peft.named_modules():
            if isinstance(module, LoraLinear):
                hook = functools.partial(lambda m, mod, args, out: observe(m, args[0].detach()), name)
                handles.append(module.register_forward_hook(hook))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _base_weights(self) -> dict[str, torch.nn.Parameter]:
        """The frozen base weight of every LoRA-adapted module, by the module's adapter-key prefix."""
        out = {}
        for name, module in self._peft.named_modules():
            base = getattr(module, "base_layer", None)
            if base is not None and hasattr(base, "weight") and hasattr(module, "lora_A"):
                out[name] = base.weight
        return out

    def reset_base(self) -> None:
        """Put every base weight `set_base_delta` changed back to its original value."""
        if not self._base_original:
            return
        weights = self._base_weights()
        for module, original in self._base_original.items():
            weights[module].data.copy_(original)

    def set_base_delta(self, delta: dict[str, torch.Tensor]) -> None:
        """Make each named module's base weight its original value plus `delta[module]`.

        Recomputed from the original (kept on first use), never accumulated in the model's
        dtype, so a resumed run that applies the same total gets the same weights bit for bit.
        Module names are the adapter tensors' prefixes (`fedse.agent.lora.lora_modules`).
        """
        weights = self._base_weights()
        unknown = sorted(set(delta) - set(weights))
        if unknown:
            raise ValueError(f"base delta for modules this model does not adapt: {unknown[:3]}")
        for module, d in delta.items():
            weight = weights[module]
            if module not in self._base_original:
                self._base_original[module] = weight.detach().clone()
            total = self._base_original[module].double() + d.double().to(weight.device)
            weight.data.copy_(total.to(weight.dtype))
