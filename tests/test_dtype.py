"""The base model's dtype: bf16 where this machine measurably runs it faster, the decision cached per CPU."""

import json

import pytest
import torch

from fedse.agent import dtype as dt

CPU = torch.device("cpu")


@pytest.fixture
def timings(monkeypatch):
    """Replace the micro-benchmark: set `timings.value` to (fp32 ms, bf16 ms); counts its calls."""

    class Fake:
        value = (3.0, 1.0)
        calls = 0

        def __call__(self, hidden, intermediate, seconds=1.0):
            self.calls += 1
            return self.value

    fake = Fake()
    monkeypatch.setattr(dt, "measure_linears", fake)
    return fake


def test_a_measured_bf16_speedup_picks_bf16_and_the_decision_is_cached(tmp_path, timings):
    choice = dt.choose_dtype(CPU, 576, 1536, tmp_path)
    assert (choice.dtype, choice.speedup, timings.calls) == ("bfloat16", 3.0, 1)
    assert "3.00x as fast" in choice.reason and "avx512_bf16" in choice.reason
    [cached] = (tmp_path / "dtype").iterdir()
    assert json.loads(cached.read_text())["dtype"] == "bfloat16"
    timings.value = (1.0, 3.0)  # a second load must not measure again
    assert dt.choose_dtype(CPU, 576, 1536, tmp_path) == choice and timings.calls == 1


def test_a_slow_bf16_path_keeps_fp32(tmp_path, timings):
    timings.value = (1.0, 3.0)
    choice = dt.choose_dtype(CPU, 576, 1536, tmp_path)
    assert choice.dtype == "float32" and "less than 1.3x" in choice.reason
    timings.value = (1.2, 1.0)  # faster, but not by enough to pay for bf16's rounding
    assert dt.choose_dtype(CPU, 576, 1536, None).dtype == "float32"


def test_the_cache_is_per_cpu_model_shape_and_isa_cap_and_a_torn_file_is_measured_again(tmp_path, timings, monkeypatch):
    dt.choose_dtype(CPU, 576, 1536, tmp_path)
    dt.choose_dtype(CPU, 960, 2560, tmp_path)  # another model's shapes
    monkeypatch.setattr(dt, "cpu_model", lambda: "Another CPU")
    dt.choose_dtype(CPU, 576, 1536, tmp_path)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")  # AMX capped off: bf16 may now be slow
    dt.choose_dtype(CPU, 576, 1536, tmp_path)
    assert timings.calls == 4 and len(list((tmp_path / "dtype").iterdir())) == 4
    for path in (tmp_path / "dtype").iterdir():
        path.write_text('{"dtype": "bfloat1')
    dt.choose_dtype(CPU, 576, 1536, tmp_path)
    assert timings.calls == 5


def test_cuda_is_bf16_without_measuring(tmp_path, timings, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    choice = dt.choose_dtype(torch.device("cuda"), 576, 1536, tmp_path)
    assert (choice.dtype, choice.reason, timings.calls) == ("bfloat16", "CUDA", 0)


def test_the_micro_benchmark_measures_both_dtypes():
    fp32_ms, bf16_ms = dt.measure_linears(64, 128, seconds=0.05)
    assert fp32_ms > 0 and bf16_ms > 0


def test_auto_resolves_through_the_measured_choice(tmp_path, timings, monkeypatch):
    from fedse.agent import model

    monkeypatch.setenv("FEDSE_CACHE", str(tmp_path))
    assert model.resolve_dtype("auto", CPU) == torch.bfloat16
    timings.value = (1.0, 3.0)
    monkeypatch.setenv("FEDSE_CACHE", str(tmp_path / "elsewhere"))
    assert model.resolve_dtype("auto", CPU) == torch.float32
    assert model.resolve_dtype("bfloat16", CPU) == torch.bfloat16 and timings.calls == 2
