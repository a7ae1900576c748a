"""Device, dtype and compile choices: fallbacks warn once and keep results unchanged."""

from __future__ import annotations

import pytest
import torch

from gptlab.device import Hardware, Precision, auto_dtype, bf16_hint, pick_dtype
from gptlab.model.config import ModelConfig
from gptlab.model.transformer import GPT
from gptlab.train.system import CompiledOrEager, device_peak_flops


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


AVX2 = Hardware("cpu", "AVX2")
AVX512_BF16 = Hardware("cpu", "AVX512", cpu_bf16=True)
AMX = Hardware("cpu", "AMX", cpu_bf16=True)  # Sapphire Rapids and newer: AMX tiles, avx512_bf16 too
AVX512_NO_BF16 = Hardware("cpu", "AVX512")  # Skylake-X, Ice Lake: AVX-512 without bf16
CUDA_BF16 = Hardware("cuda", "AVX2", cuda_bf16=True)  # Ampere and newer
CUDA_OLD = Hardware("cuda", "AVX2", cuda_bf16=False)  # Volta, Turing
MPS = Hardware("mps", "DEFAULT")


@pytest.mark.dtype_rule
@pytest.mark.parametrize("hw, expected", [
    (AVX2, torch.float32), (AVX512_NO_BF16, torch.float32), (AVX512_BF16, torch.float32), (AMX, torch.float32),
    (CUDA_BF16, torch.bfloat16), (CUDA_OLD, torch.float32), (MPS, torch.float32),
])
def test_auto_dtype_is_fp32_on_every_cpu_and_bf16_on_gpus_that_have_it(hw, expected):
    assert auto_dtype(hw) == expected
    assert pick_dtype("auto", torch.device(hw.device), hw) == Precision(expected, "auto")


@pytest.mark.dtype_rule
@pytest.mark.parametrize("hw, expected", [
    (AVX2, torch.float32), (AVX512_NO_BF16, torch.float32), (AVX512_BF16, torch.bfloat16), (AMX, torch.bfloat16),
    (CUDA_BF16, torch.bfloat16), (CUDA_OLD, torch.float32), (MPS, torch.float32),
])
def test_decoding_takes_bf16_on_cpus_with_bf16_instructions_too(hw, expected):
    assert auto_dtype(hw, decoding=True) == expected
    assert pick_dtype("auto", torch.device(hw.device), hw, decoding=True) == Precision(expected, "auto")


@pytest.mark.dtype_rule
def test_asked_dtypes_are_honoured_where_they_run_and_fall_back_with_one_warning(capsys):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for hw in (AVX2, AVX512_BF16, AMX):
        assert pick_dtype("fp32", cpu, hw) == Precision(torch.float32, "--dtype fp32")
    assert pick_dtype("bf16", cpu, AMX) == Precision(torch.bfloat16, "--dtype bf16")
    assert pick_dtype("bf16", cuda, CUDA_BF16).dtype == torch.bfloat16
    assert pick_dtype("fp16", cuda, CUDA_OLD) == Precision(torch.float16, "--dtype fp16")
    assert warnings_in(capsys.readouterr().err) == []
    # Runs, but emulated: said so.
    assert pick_dtype("bf16", cpu, AVX2) == Precision(torch.bfloat16, "--dtype bf16")
    (slow,) = warnings_in(capsys.readouterr().err)
    assert "emulated" in slow and "AVX2" in slow
    # Cannot run: what auto picks instead, said once, and the header says why.
    fp16 = pick_dtype("fp16", cpu, AMX)
    assert fp16 == Precision(torch.float32, "fp16 unavailable") and str(fp16) == "fp32 (fp16 unavailable)"
    assert pick_dtype("bf16", cuda, CUDA_OLD).dtype == torch.float32
    first, second = warnings_in(capsys.readouterr().err)
    assert "--dtype fp16 on cpu" in first and "using fp32" in first and "no bf16 support" in second


@pytest.mark.dtype_rule
def test_bf16_hint_only_for_large_models_under_auto_on_bf16_cpus():
    auto, asked = Precision(torch.float32, "auto"), Precision(torch.float32, "--dtype fp32")
    assert "--dtype bf16" in bf16_hint(auto, AMX, 124_000_000)
    assert bf16_hint(auto, AMX, 800_000) is None  # the default model: bf16 is no faster there
    assert bf16_hint(auto, AVX2, 124_000_000) is None  # emulated: far slower
    assert bf16_hint(asked, AMX, 124_000_000) is None  # the user chose fp32
    assert bf16_hint(Precision(torch.bfloat16, "auto"), CUDA_BF16, 124_000_000) is None


def test_hardware_of_this_machine_reports_its_cpu():
    hw = Hardware.of(torch.device("cpu"))
    assert hw.device == "cpu" and hw.cpu_capability == torch.backends.cpu.get_cpu_capability()
    assert not hw.cuda_bf16


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


@pytest.mark.parametrize("command", [["train"], ["finetune", "sft"], ["finetune", "lora"], ["finetune", "classify"],
                                     ["eval"], ["sample"], ["chat"], ["serve"]])
def test_every_command_that_runs_a_model_takes_dtype_with_the_one_rule(command, capsys):
    from gptlab.cli import main

    with pytest.raises(SystemExit):
        main([*command, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--dtype" in help_text and "auto" in help_text
    # the rule itself, stated where the flag is; decoding takes bf16 on CPUs that have it
    decoding = command[0] in ("sample", "chat", "serve")
    assert ("a CPU with AVX-512 BF16 or AMX" if decoding else "fp32 on every CPU") in help_text
