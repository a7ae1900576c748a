"""Int8 linear layers on the CPU, one layer kind at a time: gptlab's against PyTorch's and torchao's.

    python benchmarks/int8_kernels.py
    pip install --no-deps torchao==0.18.0     # adds torchao's variants (not a gptlab dependency)

SmolLM2-135M's layer shapes (576 -> 1536 and back, the MLP's; 576 -> 49152, the head), random
weights; batch 1 (one token, decoding) and 8. Each variant runs 20 distinct layers of a shape in
turn (so weights come from memory, not cache, as in decoding), --repeat rounds, variants in
turns; the figure is the median time per layer. Error: the output's relative distance
(Frobenius) from fp32's on a random input.

- fp32: ``F.linear``.
- gptlab int8: ``Int8Linear`` (``--quantize int8``): per-output-channel int8 weights, each row of
  activations on its own 8-bit grid, fbgemm's int8 x int8 kernel.
- torch.ao dynamic: ``torch.ao.quantization.quantize_dynamic`` (deprecated in torch 2.13): the
  same kernel family with one activation grid per call, drawn from the input's range.
- torchao int8 weight-only and torchao int8 dynamic activation + int8 weight: torchao's
  ``Int8WeightOnlyConfig`` and ``Int8DynamicActivationInt8WeightConfig`` through ``quantize_``,
  eager, when torchao is installed.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import time
import warnings

import torch
from torch import nn

from gptlab.inference.quantize import Int8Linear

SHAPES = ((576, 1536), (1536, 576), (576, 49152))


def torch_ao_dynamic(layers: nn.Sequential) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(layers), {nn.Linear}, dtype=torch.qint8)


def torchao_variants(layers: nn.Sequential) -> dict[str, nn.Module]:
    try:
        logging.disable(logging.WARNING)
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        print("torchao left out: pip install --no-deps torchao==0.18.0")
        return {}
    finally:
        logging.disable(logging.NOTSET)
    out = {}
    for name, config in (("torchao int8 weight-only", Int8WeightOnlyConfig()),
                         ("torchao int8 dyn. act. + weight", Int8DynamicActivationInt8WeightConfig())):
        m = copy.deepcopy(layers)
        quantize_(m, config)
        out[name] = m
    return out


def per_layer_seconds(layers, x: torch.Tensor) -> float:
    start = time.perf_counter()
    for layer in layers:
        layer(x)
    return (time.perf_counter() - start) / len(layers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--layers", type=int, default=20)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads; load average before: {os.getloadavg()[0]:.2f}")
    print(f"{'shape':>12} {'batch':>5}  {'variant':32} {'us/layer':>9} {'vs fp32':>8} {'error':>7}")
    for fan_in, fan_out in SHAPES:
        n = args.layers if fan_out < 10_000 else 4
        fp32 = nn.Sequential(*[nn.Linear(fan_in, fan_out, bias=False) for _ in range(n)]).eval()
        variants = {"fp32": fp32, "gptlab int8": nn.Sequential(*[Int8Linear.from_linear(lin) for lin in fp32]),
                    "torch.ao dynamic": torch_ao_dynamic(fp32), **torchao_variants(fp32)}
        for batch in (1, 8):
            x = torch.randn(batch, fan_in)
            with torch.no_grad():
                reference = fp32[0](x)
                errors = {k: ((m[0](x) - reference).norm() / reference.norm()).item() for k, m in variants.items()}
                for m in variants.values():
                    per_layer_seconds(m, x)  # warm-up
                runs = [{k: per_layer_seconds(m, x) for k, m in variants.items()} for _ in range(args.repeat)]
            for k in variants:
                t = statistics.median(r[k] for r in runs)
                ratio = statistics.median(r["fp32"] / r[k] for r in runs)
                print(f"{fan_in:>5}x{fan_out:<6} {batch:>5}  {k:32} {t * 1e6:9.1f} {ratio:7.2f}x {errors[k]:7.4f}",
                      flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
