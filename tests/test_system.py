"""Device, dtype and compile choices: fallbacks warn once and keep results unchanged."""

from __future__ import annotations

import pytest
import torch

from gptlab.model.config import ModelConfig
from gptlab.model.transformer import GPT
from gptlab.train import system
from gptlab.train.system import CompiledOrEager, device_peak_flops, pick_dtype


def failing_backend(gm, example_inputs):
    raise RuntimeError("no C++ compiler found (simulated)")


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16))


def warnings_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning:")]


def test_compile_failure_falls_back_to_eager_with_one_warning(capsys):
    torch._dynamo.reset()
    model = tiny_model()
    wrapped = CompiledOrEager(model, backend=failing_backend)
    x = torch.randint(20, (2, 8))
    first, second = wrapped(x)[0], wrapped(x)[0]
    warned = warnings_in(capsys.readouterr().err)
    assert len(warned) == 1 and "torch.compile failed" in warned[0] and "simulated" in warned[0]
    assert wrapped.fell_back
    expected = model(x)[0]
    assert torch.equal(first, expected) and torch.equal(second, expected)
    # The wrapper is the model for state_dict and train/eval purposes: no duplicated entries.
    assert list(wrapped.state_dict()) == [f"module.{k}" for k in model.state_dict()]
    wrapped.eval()
    assert not model.training


def test_an_error_of_the_model_itself_propagates_without_blaming_the_compiler(capsys):
    torch._dynamo.reset()
    wrapped = CompiledOrEager(tiny_model(), backend=failing_backend)
    with pytest.raises(Exception):
        wrapped(torch.randint(20, (2, 9)))  # longer than block_size: an error eager raises too
    assert warnings_in(capsys.readouterr().err) == [] and not wrapped.fell_back


def test_a_working_compile_is_used_and_matches_eager(capsys):
    torch._dynamo.reset()
    model = tiny_model()
    wrapped = CompiledOrEager(model, backend="eager")  # dynamo tracing without code generation: quick
    x = torch.randint(20, (2, 8))
    torch.testing.assert_close(wrapped(x)[0], model(x)[0])
    assert not wrapped.fell_back and warnings_in(capsys.readouterr().err) == []


def test_dtype_fallbacks_warn_and_auto_never_does(capsys, monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(system, "cpu_has_fast_bf16", lambda: False)
    assert pick_dtype("auto", cpu) == torch.float32
    assert pick_dtype("fp32", cpu) == torch.float32
    assert warnings_in(capsys.readouterr().err) == []
    assert pick_dtype("fp16", cpu) == torch.float32
    assert pick_dtype("bf16", cpu) == torch.bfloat16  # asked for and possible, but slow: said so
    fp16, bf16 = warnings_in(capsys.readouterr().err)
    assert "fp16 on cpu" in fp16 and "using fp32" in fp16
    assert "emulated" in bf16
    monkeypatch.setattr(system, "cpu_has_fast_bf16", lambda: True)
    assert pick_dtype("auto", cpu) == torch.bfloat16 and pick_dtype("fp16", cpu) == torch.bfloat16
    assert pick_dtype("bf16", cpu) == torch.bfloat16
    assert len(warnings_in(capsys.readouterr().err)) == 1  # only the fp16 fallback


@pytest.mark.parametrize("name, dtype, precision, tflops", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, "highest", 989.4),
    ("NVIDIA H100 PCIe", torch.bfloat16, "highest", 756.0),
    ("NVIDIA H200", torch.bfloat16, "highest", 989.4),
    ("NVIDIA A100-SXM4-40GB", torch.float32, "highest", 19.5),
    ("NVIDIA A100-SXM4-40GB", torch.float32, "high", 156.0),  # TF32 tensor cores
    ("NVIDIA GeForce RTX 4090", torch.float16, "highest", 165.2),
    ("Tesla V100-SXM2-16GB", torch.bfloat16, "highest", None),  # no bf16 on V100
    ("Some Future GPU", torch.bfloat16, "highest", None),
])
def test_device_peaks_come_from_the_table(monkeypatch, name, dtype, precision, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: precision)
    peak = device_peak_flops(torch.device("cuda"), dtype)
    assert peak == (None if tflops is None else pytest.approx(tflops * 1e12))


def test_cpu_has_no_table_peak():
    assert device_peak_flops(torch.device("cpu"), torch.float32) is None
