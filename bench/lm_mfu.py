"""Pretraining throughput and model FLOPs utilization (MFU): largo's `pretrain_fit()` vs a hand-written loop.

The machine's peak is measured in the same run: large square matmuls in fp32 and bf16 (best of several
sizes and repeats, at the benchmark's thread count), once at the start and once per round; the peak of
a dtype is the best of all its probes, so a slow moment lowers no MFU figure. The model is a GPT of
`largo.models.gpt` (CPU: the gpt-14m preset, dim 384, 6 layers, 6 heads, context 256, vocabulary
8,192, ~13.8M parameters; CUDA: gpt2-124m, vocabulary 50,304) trained on random windows of a
synthetic token stream (Zipf-distributed ids with some repeated phrases, so the loss falls; no corpus is
needed). FLOPs per token = 6·N + 12·L·d·T (N parameters, tied embedding once; L layers, d width,
T context: PaLM's / nanoGPT's estimate), MFU = tokens/s · FLOPs per token ÷ the measured peak of the
dtype the matmuls run in.

Two loops train the same model class on the same data, batch 16 × context, AdamW (fused) lr 1e-3,
betas (0.9, 0.95), weight decay 0.1, warmup + cosine, gradient clipping at 1.0:

    largo   `largo.train.lm.pretrain_fit(model, data, LMTrainConfig(...), context)`, progress off,
            no checkpoints, one held-out evaluation at the end (two windows); timed around the whole
            call (optimizer set-up, prefetch thread, the evaluation: all of it counts)
    hand    nanoGPT's train.py cut to its core: get_batch (random windows, torch.stack), forward
            under autocast, loss / tokens, backward, clip, AdamW(fused=True) step,
            zero_grad(set_to_none=True), the cosine lr set by hand; the loss read once at the end;
            then, like nanoGPT's estimate_loss(), the held-out loss of the same two windows (the work
            largo's final evaluation does, ~1% of a 5-step measurement; without it largo measured 0.99x)

Variants: eager-fp32, compile-fp32 (torch.compile of the model), compile-bf16 (+ bf16 autocast); also
eager-bf16 on request. Every variant's largo and hand loops share one model (deep copies of one
initialization per variant, so compiled graphs are reused) and are warmed up (compiled) first. The
machine is shared and noisy: every round runs each variant's two loops back to back (A, B; the next
round B, A) for `--steps` optimizer steps each, and the script reports medians and the per-round
largo / hand ratios. Goals: largo >= 1.0x the best hand-written variant, fp32 MFU >= 0.6, bf16 MFU >= 0.3.

    .venv/bin/python bench/lm_mfu.py                     # CPU: gpt-14m, 3 variants, 5 rounds (8-15 min)
    .venv/bin/python bench/lm_mfu.py --variants eager-fp32 compile-bf16 --rounds 7
    .venv/bin/python bench/lm_mfu.py --quick             # smoke test: tiny model, eager only (< 1 min)
    .venv/bin/python bench/lm_mfu.py --profile           # + torch.profiler of two largo steps a variant
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import math
import os
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from largo.config_lm import GPTConfig, LMTrainConfig
from largo.data.corpus import TokenData
from largo.models.gpt import GPT
from largo.train.lm import pretrain_fit

# variant → (torch.compile the model, precision)
VARIANTS: dict[str, tuple[bool, str]] = {
    "eager-fp32": (False, "fp32"),
    "compile-fp32": (True, "fp32"),
    "compile-bf16": (True, "bf16"),
    "eager-bf16": (False, "bf16"),
}
GOAL_RATIO, GOAL_MFU = 1.0, {"fp32": 0.6, "bf16": 0.3}
LR, BETAS, WEIGHT_DECAY, CLIP, SEED = 1e-3, (0.9, 0.95), 0.1, 1.0, 42
# dense bf16 tensor-core peaks from the datasheets (FLOP/s, without sparsity), by device-name substring
DATASHEET_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12}
SIZES = {  # what one run of the benchmark trains
    "cpu": {"model": {"preset": "gpt-14m"}, "vocab": 8192, "micro_batch": 16, "steps": 5, "rounds": 5},
    "cuda": {"model": {"preset": "gpt2-124m"}, "vocab": 50304, "micro_batch": 16, "steps": 30, "rounds": 5},
    "quick": {
        "model": {"dim": 128, "layers": 2, "heads": 4, "context": 128},
        "vocab": 2048,
        "micro_batch": 8,
        "steps": 4,
        "rounds": 2,
    },
}
DEFAULT_VARIANTS = {
    "cpu": ["eager-fp32", "compile-fp32", "compile-bf16"],
    "cuda": ["compile-bf16", "eager-bf16"],
    "quick": ["eager-fp32", "eager-bf16"],
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ------------------------------------------------------------------------------------------ peak


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(dtype: torch.dtype, device: torch.device, n: int, min_time: float = 0.25) -> float:
    """FLOP/s of n×n @ n×n matmuls in `dtype`, repeated for at least `min_time` seconds."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    _sync(device)
    reps, t0 = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        if reps % 4 == 0 or device.type == "cpu":
            _sync(device)
            elapsed = time.perf_counter() - t0
            if elapsed >= min_time:
                return reps * 2 * n**3 / elapsed


def peak_probe(device: torch.device, sizes: tuple[int, ...], repeats: int) -> dict[str, float]:
    """The best matmul FLOP/s per precision over `sizes` × `repeats` measurements."""
    return {
        name: max(matmul_flops(dtype, device, n) for n in sizes for _ in range(repeats))
        for name, dtype in DTYPES.items()
    }


# ------------------------------------------------------------------------------------------ data


def synthetic_tokens(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    """A token stream with some structure: Zipf-distributed ids, a quarter of them in repeated 8-id
    phrases (so a model learns something), stored like largo's token files (uint16)."""
    rng = np.random.default_rng(seed)
    ids = (rng.zipf(1.2, n) - 1) % vocab
    phrases = rng.integers(0, vocab, size=(256, 8))
    where = rng.integers(0, n // 8, size=n // 32) * 8
    for k in range(8):
        ids[np.minimum(where + k, n - 1)] = phrases[where % 256, k]
    return ids.astype(np.uint16 if vocab <= 1 << 16 else np.uint32)


def token_data(n_train: int, vocab: int, context: int) -> TokenData:
    """TokenData of a synthetic train stream and a two-window held-out stream (a cheap final eval)."""
    train = synthetic_tokens(n_train, vocab, seed=0)
    valid = synthetic_tokens(2 * context + 2, vocab, seed=1)
    meta = {"valid_chars": 4 * len(valid), "valid_tokens": len(valid), "vocab_size": vocab}
    return TokenData(train, valid, meta)


def flops_per_token(cfg: GPTConfig, params: int) -> int:
    """6·N + 12·L·d·T: the matmul FLOPs of one trained token, forward and backward (attention included)."""
    return 6 * params + 12 * cfg.layers * cfg.dim * cfg.context


# ----------------------------------------------------------------------------------------- loops


def largo_loop(
    model: GPT, data: TokenData, steps: int, micro_batch: int, variant: str, device: torch.device
) -> float:
    """`steps` optimizer steps of largo's `pretrain_fit`; returns the final training loss."""
    compile_, precision = VARIANTS[variant]
    cfg = LMTrainConfig.model_validate(
        {
            "steps": steps,
            "micro_batch": micro_batch,
            "optimizer": {"name": "adamw", "lr": LR, "weight_decay": WEIGHT_DECAY, "betas": BETAS},
            "schedule": {"name": "cosine", "warmup": 0.02, "min_lr_ratio": 0.1},
            "clip_grad_norm": CLIP,
            "precision": precision,
            "compile": compile_,
            "eval_every": steps,
            "eval_batches": 1,
            "checkpoint_every": 1 << 30,
            "device": device.type,
            "seed": SEED,
            "progress": False,
        }
    )
    with contextlib.redirect_stderr(io.StringIO()):  # its log lines
        result = pretrain_fit(model, data, cfg, model.cfg.context)
    return result.history[-1]["train.loss"]


def hand_loop(
    model: GPT, data: TokenData, steps: int, micro_batch: int, variant: str, device: torch.device
) -> float:
    """`steps` steps of a minimal nanoGPT-style loop on the same model; returns the last step's loss."""
    compile_, precision = VARIANTS[variant]
    tokens, context = data.train, model.cfg.context
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, fused=True)
    run = torch.compile(model) if compile_ else model
    bf16 = precision == "bf16"
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    rng = np.random.default_rng(SEED)
    warmup = max(1, steps // 50)

    def get_batch() -> tuple[torch.Tensor, torch.Tensor]:
        ix = rng.integers(0, len(tokens) - context - 1, micro_batch)
        x = torch.stack([torch.from_numpy(tokens[i : i + context].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(tokens[i + 1 : i + 1 + context].astype(np.int64)) for i in ix])
        if device.type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x, y

    def lr_at(step: int) -> float:
        if step < warmup:
            return LR * (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, steps - warmup)
        return LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    model.to(device).train()
    loss = torch.zeros(())
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        x, y = get_batch()
        with amp:
            loss_sum, _ = run(x, y)
        loss = loss_sum / y.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
    train_loss = float(loss.detach())  # syncs
    # the held-out loss at the end, like nanoGPT's estimate_loss() (largo evaluates at its last step):
    # the same windows as largo's evaluation, on the uncompiled model as largo does
    model.eval()
    starts = range(0, len(data.valid) - context, context)
    rows = torch.from_numpy(np.stack([data.valid[i : i + context + 1].astype(np.int64) for i in starts]))
    with torch.no_grad(), amp:
        valid_loss, _ = model(rows[:, :-1].to(device), rows[:, 1:].to(device))
    float(valid_loss)
    model.train()
    return train_loss


LOOPS: dict[str, Callable[..., float]] = {"largo": largo_loop, "hand": hand_loop}


# ----------------------------------------------------------------------------------------- bench


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def _graphs() -> int:
    """Graphs torch.compile has compiled so far in this process (a rise during rounds = recompiles)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["stats"].get("unique_graphs", 0))


def timed(
    loop: str, model: GPT, data: TokenData, steps: int, micro_batch: int, variant: str, device: torch.device
) -> tuple[float, float]:
    """(seconds, final loss) of `steps` steps of one loop, the device synchronized at both ends."""
    _sync(device)
    t = time.perf_counter()
    loss = LOOPS[loop](model, data, steps, micro_batch, variant, device)
    _sync(device)
    return time.perf_counter() - t, loss


def profile_step(model: GPT, data: TokenData, micro_batch: int, variant: str, device: torch.device) -> None:
    """torch.profiler's op table of two largo steps (after the warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        largo_loop(model, data, 2, micro_batch, variant, device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n== profile of 2 largo steps, {variant}")
    print(prof.key_averages().table(sort_by=key, row_limit=25))


def run(args: argparse.Namespace) -> None:
    """Probe the peak, warm up every variant, then the interleaved rounds; print the tables."""
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    kind = "quick" if args.quick else device.type
    size = SIZES[kind]
    variants = args.variants or DEFAULT_VARIANTS[kind]
    steps, rounds = args.steps or size["steps"], args.rounds or size["rounds"]
    micro_batch = args.micro_batch or size["micro_batch"]
    model_cfg = GPTConfig.model_validate({**size["model"], "vocab_size": size["vocab"]})
    torch.manual_seed(0)
    model0 = GPT(model_cfg)
    n_params = model0.num_parameters()
    per_token = flops_per_token(model_cfg, n_params)
    n_train = args.train_tokens or (20_000_000 if device.type == "cuda" else 2_000_000)
    data = token_data(n_train, size["vocab"], model_cfg.context)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} cpus"
    print(
        f"torch {torch.__version__}, {device.type} ({name}), {torch.get_num_threads()} threads, "
        f"load {_load():.1f}"
    )
    print(
        f"model: dim {model_cfg.dim}, {model_cfg.layers} layers, {model_cfg.heads} heads, context "
        f"{model_cfg.context}, vocab {size['vocab']:,}: {n_params:,} parameters, "
        f"{per_token / 1e6:.1f} MFLOP per token; batch {micro_batch} × {model_cfg.context} = "
        f"{micro_batch * model_cfg.context:,} tokens per step, {steps} steps per measurement, {rounds} rounds"
    )

    # 1. the peak, then a warm-up (compilation) of every variant's two loops
    probe_sizes = (8192,) if device.type == "cuda" else ((512, 1024) if args.quick else (1024, 2048, 4096))
    peak = peak_probe(device, probe_sizes, 1 if args.quick else 3)
    print("matmul peak: " + ", ".join(f"{k} {v / 1e12:.3f} TFLOP/s" for k, v in peak.items()), flush=True)
    models = {v: copy.deepcopy(model0) for v in variants}
    for v in variants:
        for loop in LOOPS:
            seconds, _ = timed(loop, models[v], data, 2, micro_batch, v, device)
            print(f"  warm-up {v:<13} {loop:<5} 2 steps {seconds:6.1f} s", flush=True)
    graphs = _graphs()

    # 2. interleaved rounds: each variant's loops back to back, their order flipped every round
    rates: dict[tuple[str, str], list[float]] = {(v, loop): [] for v in variants for loop in LOOPS}
    losses: dict[tuple[str, str], float] = {}
    tokens = steps * micro_batch * model_cfg.context
    for r in range(rounds):
        round_peak = peak_probe(device, probe_sizes[-1:], 1)
        peak = {k: max(peak[k], round_peak[k]) for k in peak}
        order = variants[r % len(variants) :] + variants[: r % len(variants)]
        shown = []
        for v in order:
            loops = list(LOOPS) if r % 2 == 0 else list(LOOPS)[::-1]
            for loop in loops:
                seconds, losses[v, loop] = timed(loop, models[v], data, steps, micro_batch, v, device)
                rates[v, loop].append(tokens / seconds)
            shown.append(f"{v} {rates[v, 'largo'][-1]:,.0f}/{rates[v, 'hand'][-1]:,.0f}")
        probe = ", ".join(f"{k} {x / 1e12:.3f}" for k, x in round_peak.items())
        print(
            f"  round {r + 1}: largo/hand tok/s  {'   '.join(shown)}   probe {probe} TFLOP/s  "
            f"load {_load():.1f}",
            flush=True,
        )
    if _graphs() != graphs:
        print(f"  note: {_graphs() - graphs} graphs were compiled during the rounds (recompilation)")
    report(rates, losses, variants, peak, per_token, device, checked=not args.quick)
    if args.profile:
        for v in variants:
            profile_step(models[v], data, micro_batch, v, device)


def report(
    rates: dict[tuple[str, str], list[float]],
    losses: dict[tuple[str, str], float],
    variants: list[str],
    peak: dict[str, float],
    per_token: int,
    device: torch.device,
    checked: bool = True,
) -> None:
    """The per-variant table (tokens/s, TFLOP/s, MFU), the largo / hand ratios and (`checked`) the goals."""
    print(
        f"\n{'variant':<13} {'loop':<6} {'median tok/s':>12} {'min':>8} {'max':>8} {'TFLOP/s':>8} "
        f"{'MFU':>6}  {'loss':>6}"
    )
    mfu: dict[tuple[str, str], float] = {}
    for v in variants:
        precision = VARIANTS[v][1]
        for loop in LOOPS:
            xs = rates[v, loop]
            achieved = statistics.median(xs) * per_token
            mfu[v, loop] = achieved / peak[precision]
            print(
                f"{v:<13} {loop:<6} {statistics.median(xs):>12,.0f} {min(xs):>8,.0f} {max(xs):>8,.0f} "
                f"{achieved / 1e12:>8.3f} {mfu[v, loop]:>6.1%}  {losses[v, loop]:>6.3f}"
            )
    print(
        "MFU = achieved ÷ the measured matmul peak of the variant's dtype: "
        + ", ".join(f"{k} {x / 1e12:.3f} TFLOP/s" for k, x in peak.items())
    )
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        sheet = next((f for key, f in DATASHEET_BF16.items() if key in name), None)
        if sheet is not None:
            for v in variants:
                if VARIANTS[v][1] == "bf16":
                    achieved = statistics.median(rates[v, "largo"]) * per_token
                    print(
                        f"  {v} largo vs the datasheet's dense bf16 peak {sheet / 1e12:.0f} TFLOP/s: "
                        f"MFU {achieved / sheet:.1%}"
                    )
    print()
    for v in variants:
        xs = [a / b for a, b in zip(rates[v, "largo"], rates[v, "hand"], strict=True)]
        print(
            f"largo/hand {v:<13} median {statistics.median(xs):.3f}  [{min(xs):.3f}..{max(xs):.3f}]  "
            f"rounds {' '.join(f'{x:.3f}' for x in xs)}"
        )
    best = {loop: max(variants, key=lambda v: statistics.median(rates[v, loop])) for loop in LOOPS}
    pairs = zip(rates[best["largo"], "largo"], rates[best["hand"], "hand"], strict=True)
    per_round = [a / b for a, b in pairs]
    ratio = statistics.median(per_round)
    print(
        f"largo best ({best['largo']}) / hand best ({best['hand']}): median {ratio:.3f}  "
        f"[{min(per_round):.3f}..{max(per_round):.3f}]"
    )
    ok = "ok" if ratio >= GOAL_RATIO else "BELOW"
    verdicts = [f"largo/hand-best {ratio:.3f}x (goal >= {GOAL_RATIO}) {ok}"]
    for precision, goal in GOAL_MFU.items():
        chosen = [v for v in variants if VARIANTS[v][1] == precision]
        if chosen:
            top = max(mfu[v, "largo"] for v in chosen)
            ok = "ok" if top >= goal else "BELOW"
            verdicts.append(f"{precision} MFU {top:.1%} (goal >= {goal:.0%}) {ok}")
    if checked:
        print("; ".join(verdicts))
    else:
        print("smoke test (--quick): a tiny model, where fixed costs dominate; the goals are not checked")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None)
    parser.add_argument("--rounds", type=int, default=0, help="interleaved rounds (0: 5, quick 2)")
    parser.add_argument("--steps", type=int, default=0, help="steps per measurement (0: 5, CUDA 30)")
    parser.add_argument("--micro-batch", type=int, default=0, help="sequences per step (0: 16)")
    parser.add_argument("--train-tokens", type=int, default=0, help="synthetic stream (0: 2M, CUDA 20M)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (0: torch's default)")
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even where CUDA is available")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny model, eager, 2 rounds")
    parser.add_argument("--profile", action="store_true", help="torch.profiler of 2 largo steps per variant")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    run(args)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
