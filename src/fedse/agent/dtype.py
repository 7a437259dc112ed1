"""Which dtype the base model runs in: bf16 wherever this machine runs the model's matmuls faster.

On CUDA, bf16. On a CPU the answer depends on the chip, not just its flags: with AMX tiles
or AVX-512 BF16 (Intel Sapphire Rapids, Cooper Lake; AMD Zen 4/5) bf16 linears run 2-4x
faster than fp32, while without bf16 units they take a slow path several times slower than
fp32 (`fedse info` prints this machine's figures; results/measurements.md has others). So the
choice is measured: a ~1 s micro-benchmark of the model's own linear shapes, fp32 against
bf16, interleaved so that a busy neighbour slows both alike, at the first load on a machine;
bf16 is chosen when it is at least `SPEEDUP_NEEDED` faster. The decision is cached in
`$FEDSE_CACHE/dtype/` per CPU model, torch version, thread count, shape and oneDNN ISA cap,
and `fedse info` prints it with its figures. LoRA factors stay fp32 whatever the base runs in.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fedse.files import atomic_write_json

SPEEDUP_NEEDED = 1.3
"""bf16 rounds activations to 8 bits of mantissa; it must buy a clear speed-up to be chosen."""
ROWS = (8, 64)  # a decode step's and a prefill chunk's rows per linear


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str
    """"bfloat16" or "float32"."""
    reason: str
    cpu: str
    fp32_ms: float | None = None
    """Time of one round of the micro-benchmark's linears in fp32 (None: not measured)."""
    bf16_ms: float | None = None

    @property
    def speedup(self) -> float | None:
        return self.fp32_ms / self.bf16_ms if self.fp32_ms and self.bf16_ms else None


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bf16_flags() -> dict[str, bool]:
    """What torch reports of the CPU's bf16 units (information only: the choice is measured)."""
    flags = {}
    for name, probe in (("amx", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported")):
        try:
            flags[name] = bool(getattr(torch.cpu, probe)())
        except AttributeError:  # an older torch without the probe
            flags[name] = False
    return flags


def describe_bf16_flags() -> str:
    """`bf16_flags` as one line, e.g. "amx no, avx512_bf16 yes"."""
    return ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in bf16_flags().items())


def measure_linears(hidden: int, intermediate: int, seconds: float = 1.0) -> tuple[float, float]:
    """Median ms of one round of the model's MLP linears (up and down, at `ROWS` rows), fp32 and bf16."""
    rounds: dict[torch.dtype, list[float]] = {torch.float32: [], torch.bfloat16: []}
    operands = {}
    gen = torch.Generator().manual_seed(0)
    for dtype in rounds:
        operands[dtype] = [
            (torch.randn(rows, k, generator=gen).to(dtype), torch.randn(n, k, generator=gen).to(dtype))
            for rows in ROWS
            for k, n in ((hidden, intermediate), (intermediate, hidden))
        ]
        for x, w in operands[dtype]:  # warm up (first calls pick kernels)
            torch.nn.functional.linear(x, w)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(rounds[torch.bfloat16]) < 5:
        for dtype, pairs in operands.items():
            start = time.perf_counter()
            for x, w in pairs:
                torch.nn.functional.linear(x, w)
            rounds[dtype].append((time.perf_counter() - start) * 1e3)
    median = {d: sorted(t)[len(t) // 2] for d, t in rounds.items()}
    return median[torch.float32], median[torch.bfloat16]


ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
"""Environment variables that cap the instructions oneDNN uses: with AMX capped off, bf16 took
2.0 ms against fp32's 1.35 ms on a Xeon where AMX gave 0.2 ms (256x576x1536, 2 threads)."""


def _cache_file(cache: Path, hidden: int, intermediate: int) -> Path:
    caps = ",".join(os.environ.get(name, "") for name in ISA_CAPS)
    key = f"{cpu_model()}|{torch.__version__}|{torch.get_num_threads()}|{hidden}|{intermediate}|{caps}"
    return cache / "dtype" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def _read_cached(path: Path) -> DtypeChoice | None:
    try:
        choice = DtypeChoice(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):  # absent, torn or from another version: measure again
        return None
    return choice if choice.dtype in ("bfloat16", "float32") else None


def choose_dtype(device: torch.device, hidden: int, intermediate: int, cache: Path | None) -> DtypeChoice:
    """bf16 on CUDA; on a CPU, bf16 if measured at least `SPEEDUP_NEEDED` faster, else fp32.

    `cache`: the folder holding earlier decisions (None: measure every time, keep nothing)."""
    if device.type == "cuda":
        return DtypeChoice("bfloat16", "CUDA", torch.cuda.get_device_name(device))
    if device.type != "cpu":
        return DtypeChoice("float32", f"no measured rule for device {device.type!r}", device.type)
    path = _cache_file(cache, hidden, intermediate) if cache is not None else None
    if path is not None and (cached := _read_cached(path)) is not None:
        return cached
    fp32_ms, bf16_ms = measure_linears(hidden, intermediate)
    speedup = fp32_ms / bf16_ms
    flags = describe_bf16_flags()
    verdict = "at least" if speedup >= SPEEDUP_NEEDED else "less than"
    reason = f"bf16 linears measured {speedup:.2f}x as fast as fp32 ({verdict} {SPEEDUP_NEEDED}x; {flags})"
    choice = DtypeChoice("bfloat16" if speedup >= SPEEDUP_NEEDED else "float32", reason, cpu_model(), fp32_ms, bf16_ms)
    if path is not None:
        atomic_write_json(path, asdict(choice))
    return choice
