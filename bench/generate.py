"""Generation speed: tokens/s of `largo.models.gpt.generate_ids` with and without the KV cache, fp32 and bf16.

One GPT (CPU: the gpt-14m preset, dim 384, 6 layers, 6 heads, context 256, vocabulary 8,192, random
init; speed does not depend on the weights' values) continues the same 32-token prompt greedily
(temperature 0) for 200 new tokens at batch 1. Variants:

    cache          the KV cache: each step runs the one new token through the model
    no-cache       no cache: each step runs the whole sequence so far again (what the cache saves)
    cache-amp      the cache under bf16 autocast (weights cast to bf16 at every matmul)
    no-cache-amp   no cache, bf16 autocast
    cache-bf16     the cache with the weights stored in bf16 (`model.to(torch.bfloat16)`)
    onnx           ONNX Runtime on the graph `largo export` writes for an LM (one step with its KV cache
                   as inputs and outputs; `lm_onnx.OnnxRows`, what `largo serve --runtime onnx` runs)
    onnx-int8      the same graph with int8 weights (ONNX Runtime dynamic quantization)

tokens/s counts the new tokens over the whole call, prompt (prefill) included. Greedy decoding makes
the variants comparable token for token: the script checks that cache and no-cache (fp32) produce the
same tokens, and reports how many of the bf16 variants' tokens match fp32's. The machine is shared
and noisy: every round runs each variant once in a rotated order (after a warm-up), and the script
reports medians and the per-round ratios to `no-cache`.

    .venv/bin/python bench/generate.py                  # gpt-14m, 200 new tokens, 5 rounds (~3 min)
    .venv/bin/python bench/generate.py --new-tokens 100 --rounds 9
    .venv/bin/python bench/generate.py --quick          # smoke test: tiny model, 2 rounds (< 30 s)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from largo.config_lm import GPTConfig
from largo.models.gpt import GPT, generate_ids
from probe import peak_probe

# variant → (use the KV cache, bf16 autocast, bf16 weights)
VARIANTS: dict[str, tuple[bool, bool, bool]] = {
    "cache": (True, False, False),
    "no-cache": (False, False, False),
    "cache-amp": (True, True, False),
    "no-cache-amp": (False, True, False),
    "cache-bf16": (True, False, True),
}
ONNX_VARIANTS = ("onnx", "onnx-int8")
BASE = "no-cache"
SIZES = {
    "full": {"model": {"preset": "gpt-14m"}, "vocab": 8192, "prompt": 32, "new": 200, "rounds": 5},
    "quick": {
        "model": {"dim": 64, "layers": 2, "heads": 4, "context": 96},
        "vocab": 1024,
        "prompt": 16,
        "new": 48,
        "rounds": 2,
    },
}


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def onnx_models(model: GPT, folder: Path, threads: int) -> dict[str, object]:
    """The model exported as `largo export` does (fp32 and int8) → variant → `OnnxLM`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from largo.deploy.export_lm import export_lm_onnx
    from largo.deploy.lm_onnx import OnnxLM

    export_lm_onnx(model, folder / "model.onnx")
    quantize_dynamic(str(folder / "model.onnx"), str(folder / "model.int8.onnx"), weight_type=QuantType.QInt8)
    return {
        "onnx": OnnxLM(folder / "model.onnx", threads),
        "onnx-int8": OnnxLM(folder / "model.int8.onnx", threads),
    }


def generate_onnx(lm: object, prompt: torch.Tensor, new_tokens: int, context: int) -> list[int]:
    """Greedy new token ids on ONNX Runtime (batch 1, through `OnnxRows` as the server decodes)."""
    from largo.deploy.lm_onnx import OnnxRows

    rows = OnnxRows(lm, 1, context)
    logits = rows.add(prompt[0].tolist())
    out = [int(np.argmax(logits))]
    while len(out) < new_tokens:
        out.append(int(np.argmax(rows.step(out[-1:])[0])))
    return out


def generate(model: object, prompt: torch.Tensor, new_tokens: int, variant: str) -> list[int]:
    """Greedy new token ids of one variant (batch 1)."""
    if variant in ONNX_VARIANTS:
        return generate_onnx(model, prompt, new_tokens, prompt.shape[1] + new_tokens)
    use_cache, amp, _ = VARIANTS[variant]
    device = prompt.device
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    with ctx:
        steps = generate_ids(model, prompt, new_tokens, temperature=0.0, use_cache=use_cache)
        ids = torch.stack(list(steps), dim=1)  # [1, new]; one sync at the end
    return ids[0].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    every = [*VARIANTS, *ONNX_VARIANTS]
    parser.add_argument("--variants", nargs="+", choices=every, default=every)
    parser.add_argument("--new-tokens", type=int, default=0, help="tokens to generate (0: 200, quick 48)")
    parser.add_argument("--rounds", type=int, default=0, help="interleaved rounds (0: 5, quick 2)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny model, 2 rounds")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    size = SIZES["quick" if args.quick else "full"]
    new_tokens, rounds = args.new_tokens or size["new"], args.rounds or size["rounds"]
    variants = [v for v in every if v in args.variants]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = GPTConfig.model_validate({**size["model"], "vocab_size": size["vocab"]})
    if size["prompt"] + new_tokens > cfg.context:
        parser.error(f"--new-tokens: prompt {size['prompt']} + {new_tokens} > the context {cfg.context}")
    torch.manual_seed(0)
    fp32 = GPT(cfg).to(device).eval()
    bf16 = GPT(cfg).to(device).eval()
    bf16.load_state_dict(fp32.state_dict())
    bf16.to(torch.bfloat16)
    models: dict[str, object] = {v: bf16 if VARIANTS[v][2] else fp32 for v in variants if v in VARIANTS}
    if device.type == "cpu" and any(v in ONNX_VARIANTS for v in variants):
        folder = Path(tempfile.mkdtemp(prefix="largo-bench-onnx-"))
        exported = onnx_models(fp32, folder, torch.get_num_threads())
        models |= {v: exported[v] for v in variants if v in ONNX_VARIANTS}
    variants = [v for v in variants if v in models]  # ONNX Runtime is timed on the CPU only
    prompt = torch.randint(0, size["vocab"], (1, size["prompt"]), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(device)
    print(
        f"torch {torch.__version__}, {device.type}, {torch.get_num_threads()} threads, load {_load():.1f}\n"
        f"model: dim {cfg.dim}, {cfg.layers} layers, {cfg.heads} heads, context {cfg.context}, vocab "
        f"{size['vocab']:,}: {fp32.num_parameters():,} parameters; prompt {size['prompt']} tokens, "
        f"{new_tokens} new tokens, greedy, batch 1, {rounds} rounds"
    )

    outputs: dict[str, list[int]] = {}
    for v in variants:  # warm-up (allocator, kernels)
        outputs[v] = generate(models[v], prompt, min(8, new_tokens), v)
    rates: dict[str, list[float]] = {v: [] for v in variants}
    probes: list[float] = []
    for r in range(rounds):
        probes.append(peak_probe())
        for v in variants[r % len(variants) :] + variants[: r % len(variants)]:
            _sync(device)
            t = time.perf_counter()
            outputs[v] = generate(models[v], prompt, new_tokens, v)
            _sync(device)
            rates[v].append(new_tokens / (time.perf_counter() - t))
        shown = "  ".join(f"{v}={rates[v][-1]:,.0f}" for v in variants)
        probe_ = f"probe {probes[-1]:.0f} GFLOP/s   load {_load():.1f}"
        print(f"  round {r + 1}: {shown} tok/s   {probe_}", flush=True)

    print(
        f"\n{'variant':<14} {'median tok/s':>12} {'min':>8} {'max':>8} {'ms/token':>9} "
        f"{'÷ ' + BASE:>11} {'same tokens as fp32':>20}"
    )
    reference = outputs.get("cache") or outputs.get(BASE)
    for v in variants:
        xs = rates[v]
        ratio = "-"
        if BASE in rates:
            ratio = f"{statistics.median([a / b for a, b in zip(xs, rates[BASE], strict=True)]):.2f}x"
        same = sum(a == b for a, b in zip(outputs[v], reference or [], strict=False))
        print(
            f"{v:<14} {statistics.median(xs):>12,.1f} {min(xs):>8,.1f} {max(xs):>8,.1f} "
            f"{1000 / statistics.median(xs):>9.2f} {ratio:>11} {same:>13} / {new_tokens}"
        )
    p = probes
    print(f"peak probe {statistics.median(p):.0f} GFLOP/s (min {min(p):.0f}, max {max(p):.0f})")
    if {"cache", BASE} <= set(variants):
        xs = [a / b for a, b in zip(rates["cache"], rates[BASE], strict=True)]
        verdict = "same tokens" if outputs["cache"] == outputs[BASE] else "TOKENS DIFFER"
        print(
            f"KV cache speed-up (cache / no-cache, fp32): median {statistics.median(xs):.2f}x "
            f"[{min(xs):.2f}..{max(xs):.2f}], {verdict}"
        )
    for v in ("cache-amp", "cache-bf16", "onnx", "onnx-int8"):
        if {"cache", v} <= set(variants):
            xs = [a / b for a, b in zip(rates[v], rates["cache"], strict=True)]
            print(f"{v} / cache: median {statistics.median(xs):.2f}x [{min(xs):.2f}..{max(xs):.2f}]")


if __name__ == "__main__":
    main()
