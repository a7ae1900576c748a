"""What int8 costs in quality and gives in memory and speed: SmolLM2-135M, fp32 against int8.

    python benchmarks/int8_quality.py            # 4096 held-out tokens, windows of 512, stride 256

Held-out text: the validation split of shakespeare-tiny (its last 10%, cut as `gptlab prepare`
cuts it), tokenized with SmolLM2's own tokenizer; the first --tokens tokens. Perplexity uses
sliding windows: each window of --window tokens scores only the tokens the previous one did not,
so every token is predicted once, with at least window - stride tokens of context (except at
the start). The variants take turns window by window, so load on a shared machine falls on all
alike; each window also gives how often a variant's most likely next token is fp32's.

Variants:
- fp32: the model as loaded.
- int8: ``quantize_int8`` as ``--quantize int8`` applies it: every Linear and the head with
  per-output-channel int8 weights, each token's activations rounded to 8 bits on a grid of its
  own (fbgemm's int8 x int8 kernels), the layers that read a norm smoothed by the calibration
  text (``calibration_ids``).
- int8, not smoothed: the same without the calibration.
- int8 weights only (a reference): the same int8 weights turned back into floats, activations
  in float32: what int8 costs when only the weights are rounded.
- fbgemm W8A8, one grid per call (a reference, not part of gptlab): torch's dynamic quantisation
  (``torch.ao.quantization.quantize_dynamic``), the same int8 weights, and all the tokens of a
  call rounded on one grid drawn from their joint range, as fbgemm's dynamic kernels do.

Then decode tokens/s at batch 1 (a 64-token prompt, --new-tokens greedy tokens, variants in
turns, median of --repeat rounds) and the bytes of each variant's weights.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from gptlab.data.prepare import split_point
from gptlab.data.sources import load_corpus
from gptlab.inference.quantize import checkpoint_calibration, quantize_int8, quantize_weight, weight_bytes
from gptlab.weights.load import load_checkpoint

from engine_decode import ours  # decode tok/s timed as the engine benchmark times it (this folder is on sys.path)


def fbgemm_w8a8(model: nn.Module) -> nn.Module | None:
    """torch's dynamic int8 quantisation of every Linear, or None where fbgemm is missing."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch marks its quantised tensors as deprecated
        torch.backends.quantized.engine = "fbgemm"
        # Per-channel int8 weights, as gptlab's; activations per tensor, as fbgemm's kernels take them.
        spec = {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), spec, dtype=torch.qint8)


def weights_only(model: nn.Module) -> nn.Module:
    """Every Linear of the blocks and the head with its weight rounded to int8 (per output
    channel, as ``quantize_int8`` rounds it) and kept as floats: activations stay float32."""
    linears = [m for m in [*model.layers.modules(), model.lm_head] if isinstance(m, nn.Linear)]
    if model.lm_head.weight is model.embed_tokens.weight:  # untie: the lookups keep the float table
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    with torch.no_grad():
        for linear in linears:
            q, scale = quantize_weight(linear.weight)
            linear.weight.copy_(q.float() * scale[:, None])
    return model


def state_bytes(model: nn.Module) -> int:
    """Bytes of the state dict, each storage once (packed int8 weights are not parameters: they
    appear as (weight, bias) pairs)."""
    seen = {}
    for value in model.state_dict().values():
        for t in value if isinstance(value, tuple) else (value,):
            if isinstance(t, torch.Tensor):
                seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, new): inputs ids[begin:end] predict ids[begin + 1 : end + 1], of which the
    last ``new`` are scored (the rest were scored by an earlier window)."""
    out, scored = [], 0
    for begin in range(0, n - 1, stride):
        end = min(begin + window, n - 1)
        out.append((begin, end, end - scored))
        scored = end
        if end == n - 1:
            break
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--stride", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    ckpt = load_checkpoint(args.model)
    fp32 = ckpt.model.eval()
    calibration = checkpoint_calibration(ckpt)
    variants = {"fp32": fp32, "int8": quantize_int8(copy.deepcopy(fp32), calibration),
                "int8, not smoothed": quantize_int8(copy.deepcopy(fp32)),
                "int8 weights only": weights_only(copy.deepcopy(fp32))}
    if (w8a8 := fbgemm_w8a8(fp32)) is not None:
        variants["fbgemm W8A8"] = w8a8
    text = load_corpus("shakespeare-tiny").text
    held_out = text[split_point(text, 0.1):]
    ids = torch.tensor(ckpt.tokenizer.encode(held_out)[: args.tokens])
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads; {args.model}; shakespeare-tiny validation, "
          f"{len(ids)} tokens, window {args.window}, stride {args.stride}; load average before: "
          f"{os.getloadavg()[0]:.2f}", flush=True)

    nll = dict.fromkeys(variants, 0.0)
    agree = dict.fromkeys(variants, 0)
    seconds = dict.fromkeys(variants, 0.0)
    spans = windows(len(ids), args.window, args.stride)
    with torch.no_grad():
        for begin, end, new in spans:
            x, y = ids[None, begin:end], ids[end - new + 1 : end + 1]
            top = None
            for name, model in variants.items():
                start = time.perf_counter()
                logits = model(x)[0][0, -new:].float()  # (new, V): the positions scored here
                seconds[name] += time.perf_counter() - start
                nll[name] += F.cross_entropy(logits, y, reduction="sum").item()
                best = logits.argmax(-1)
                top = best if top is None else top
                agree[name] += int((best == top).sum())
        scored = sum(new for _, _, new in spans)
        fed = sum(end - begin for begin, end, _ in spans)
        prompt = ids[None, :64]
        runs = [{name: ours(m, prompt, args.new_tokens)[1] for name, m in variants.items()}
                for _ in range(args.repeat)]

    print(f"{'variant':17} {'perplexity':>10} {'change':>8} {'top-1 = fp32':>12} {'weights MB':>10} "
          f"{'prefill tok/s':>13} {'decode tok/s':>12}")
    base = math.exp(nll["fp32"] / scored)
    for name, model in variants.items():
        ppl = math.exp(nll[name] / scored)
        size = weight_bytes(model) if name != "fbgemm W8A8" else state_bytes(model)
        tps = statistics.median(r[name] for r in runs)
        print(f"{name:17} {ppl:10.3f} {100 * (ppl / base - 1):+7.2f}% {100 * agree[name] / scored:11.1f}% "
              f"{size / 1e6:10.1f} {fed / seconds[name]:13.1f} {tps:12.1f}")
    for name in list(variants)[1:]:
        print(f"{name} / fp32 decode: {statistics.median(r[name] / r['fp32'] for r in runs):.2f}x")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
