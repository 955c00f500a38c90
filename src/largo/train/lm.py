"""The language-model training loop: `pretrain_fit()` reads top to bottom, `lm_step()` is one step.

pretrain_fit: optimizer and schedule → resume if asked → for each step: draw its micro-batches (a
function of seed and step only, prefetched on a thread) → forward/backward each, the summed token loss
divided by the token count of the whole step → clip → step → schedule → every eval_every steps:
held-out loss, perplexity, bits per character → checkpoint. Nothing in the hot loop waits for the
device: the loss is read back only when logged.

Under torchrun (WORLD_SIZE > 1, the process group up: `distributed.init_distributed()`) the same loop
runs data-parallel: the model is wrapped in DistributedDataParallel, each step's micro-batches are
drawn as in one process holding all of them and dealt out by rank, the loss is divided by the step's
token count over every rank, and gradients are all-reduced once per step (no_sync on the earlier
micro-batches). A run on N processes therefore takes the same steps as one process accumulating N
times as many micro-batches. Evaluation windows are shared out and their sums all-reduced; rank 0
writes checkpoints, which hold every rank's RNG state.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from largo.config_lm import LMTrainConfig
from largo.data.corpus import IGNORE, TokenData, windows
from largo.train.checkpoint import (
    full_state_dict,
    load_checkpoint,
    restore,
    restore_sharded,
    save_checkpoint_from_rank0,
    seed_everything,
)
from largo.train.distributed import (
    all_reduce_sum,
    data_parallel,
    group_rank_and_size,
    is_main_process,
    log,
    pick_device,
    shard_model,
    sync_gradients,
)
from largo.train.loop import autocast, optimizer_step
from largo.train.optim import build_optimizer, build_schedule

MicroBatch = tuple[torch.Tensor, torch.Tensor]  # inputs, targets [b, t]


@dataclass
class LMFitResult:
    """What a finished `pretrain_fit()` reports."""

    history: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    tokens: int = 0
    train_time_s: float = 0.0
    state: dict[str, Any] | None = None  # a sharded (FSDP) run's whole weights, on rank 0: for the bundle

    @property
    def tokens_per_s(self) -> float:
        """Training tokens per second of this run's wall time."""
        return self.tokens / max(1e-9, self.train_time_s)


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' → bf16 on CUDA GPUs that support it and on CPUs with bf16 matmul instructions, else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return "fp32"


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has bf16 matmul instructions (AMX tiles or AVX-512 BF16): there bf16 autocast
    trains 2-3× faster than fp32; elsewhere bf16 is emulated and slower."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return False
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def accumulation(cfg: LMTrainConfig, context: int, world: int = 1) -> int:
    """Micro-batches per optimizer step and process to reach tokens_per_step over `world` processes
    (at least one)."""
    if cfg.tokens_per_step is None:
        return 1
    return max(1, math.ceil(cfg.tokens_per_step / (cfg.micro_batch * context * world)))


def step_batches(
    tokens: np.ndarray,
    seed: int,
    step: int,
    accumulate: int,
    micro_batch: int,
    context: int,
    rank: int = 0,
    world: int = 1,
    mask: np.ndarray | None = None,
) -> list[MicroBatch]:
    """Rank `rank`'s micro-batches of one optimizer step: random windows that depend only on (seed,
    step). The step's accumulate × world micro-batches are drawn as one process would draw them, and
    each rank reads its own `accumulate` of them. `mask` (a pairs corpus) makes prompt targets IGNORE."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - context, size=(accumulate * world, micro_batch))
    return [
        windows(tokens, row, context, mask) for row in starts[rank * accumulate : (rank + 1) * accumulate]
    ]


def _prefetch(make: Callable[[int], Any], first: int, last: int, depth: int = 3) -> Iterator[Any]:
    """make(step) for first ≤ step < last, computed `depth` steps ahead on a daemon thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        for s in range(first, last):
            if stop.is_set():
                return
            q.put(make(s))

    thread = threading.Thread(target=work, daemon=True, name="largo-lm-data")
    thread.start()
    try:
        for _ in range(first, last):
            yield q.get()
    finally:
        stop.set()
        while not q.empty():  # unblock a producer waiting on a full queue
            q.get_nowait()


def lm_step(
    model: nn.Module, micro: list[MicroBatch], amp: Any, scaler: torch.amp.GradScaler, world: int = 1
) -> torch.Tensor:
    """Forward and backward every micro-batch of one step; returns this rank's share of the step's mean
    token loss (detached; summed over the ranks it is the step's mean token loss).

    Each micro-batch's summed loss is divided by the token count of the whole step (over all `world`
    ranks), so N accumulated micro-batches of different lengths, on one process or several, give
    exactly the gradient of one batch holding them all. A DistributedDataParallel `model` (world > 1)
    averages gradients over the ranks, hence the factor `world`, and all-reduces them only after the
    last micro-batch.
    """
    total = all_reduce_sum(sum((y != -100).sum() for _, y in micro)).clamp(min=1)  # on the device: no sync
    step_loss = torch.zeros((), device=total.device)
    for i, (x, y) in enumerate(micro):
        with sync_gradients(model, now=i == len(micro) - 1):
            with amp:
                loss_sum, _ = model(x, y)
            loss = loss_sum / total
            (scaler.scale(loss * world) if scaler.is_enabled() else loss * world).backward()
        step_loss += loss.detach()
    return step_loss


@torch.no_grad()
def evaluate_lm(
    model: nn.Module,
    tokens: np.ndarray,
    context: int,
    micro_batch: int,
    batches: int,
    amp: Any,
    mask: np.ndarray | None = None,
) -> dict[str, float] | None:
    """Mean token loss, perplexity, the tokens counted and the windows read, on held-out windows (the
    same windows at every evaluation).

    A held-out stream shorter than the asked windows is read once, end to end, in windows of the
    context (or its own length). None when it holds fewer than two tokens. With a target `mask` (a
    pairs corpus) only the marked tokens (completions) count. Under DDP each rank reads
    every world-th window and the sums are all-reduced, so every rank returns the same figures.
    """
    n = len(tokens)
    if n < 2:
        return None
    device = next(model.parameters()).device
    length = min(context, n - 1)
    count = micro_batch * batches
    if (n - 1) // length <= count:  # tile the whole stream
        starts = np.arange(0, n - length, length)
    else:
        starts = np.sort(np.random.default_rng(0).integers(0, n - length, size=count))
    windows_read = len(starts)
    me, world = group_rank_and_size()
    # every rank runs the same number of forward passes (a sharded model all-gathers in each): the
    # ranks with one window fewer add a blank one, whose targets are all IGNORE
    count = -(-len(starts) // world)
    starts = starts[me::world]
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # summed token loss, tokens
    for lo in range(0, count, micro_batch):
        real = starts[lo : lo + micro_batch]
        blank = min(micro_batch, count - lo) - len(real)
        x, y = windows(tokens, np.concatenate([real, np.zeros(blank, dtype=np.int64)]), length, mask)
        y[len(real) :] = IGNORE
        with amp:
            s, c = model(x.to(device), y.to(device))
        sums += torch.stack([s.double(), c.double()])
    model.train()
    loss_sum, counted = all_reduce_sum(sums).tolist()
    if counted == 0:  # a pairs stream whose windows hold no completion token: nothing to score
        return None
    loss = loss_sum / counted
    perplexity = math.exp(min(loss, 50.0))
    return {"loss": loss, "perplexity": perplexity, "tokens": int(counted), "windows": windows_read}


def pretrain_fit(
    model: nn.Module,
    data: TokenData,
    cfg: LMTrainConfig,
    context: int,
    *,
    checkpoint_dir: Any = None,
    resume: bool = False,
    on_eval: Callable[[dict[str, float]], None] | None = None,
) -> LMFitResult:
    """Train a GPT in place on random windows of `data.train`, validating on `data.valid`.

    Args:
        model: a GPT (forward(ids, targets) → summed loss, token count); moved to the device.
        data: the tokenized corpus.
        cfg: the train section of the LM config.
        context: window length in tokens.
        checkpoint_dir: where last.pt goes; None disables checkpoints.
        resume: continue from checkpoint_dir/last.pt when it exists (the same weights as a run that was
            never stopped: the data of a step depends only on seed and step, and RNG states are saved).
        on_eval: called with each evaluation's log record (on every rank under DDP).
    """
    me, world = group_rank_and_size()
    seed_everything(cfg.seed + me)  # dropout differs by rank; the data depend on cfg.seed alone
    device = pick_device(cfg.device)
    sharded = world > 1 and cfg.parallel == "fsdp"
    if sharded:  # shards, not the whole model, go to the device; before the optimizer, which holds them
        shard_model(model, list(getattr(model, "blocks", [])), device)
    else:
        model.to(device)
    precision = resolve_precision(cfg.precision, device)
    amp = autocast(device, precision)
    accumulate = accumulation(cfg, context, world)
    optimizer = build_optimizer(model, cfg.optimizer, device)
    scheduler = build_schedule(optimizer, cfg.schedule, cfg.steps, cfg.eval_every)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    params = [p for p in model.parameters() if p.requires_grad]
    tokens_per_step = world * accumulate * cfg.micro_batch * context
    ranks = f"{world} processes × " if world > 1 else ""
    log(
        f"pretraining: {sum(p.numel() for p in params):,} trainable parameters, {precision}, "
        f"{ranks}{accumulate} × {cfg.micro_batch} × {context} = {tokens_per_step:,} tokens per step, "
        f"{cfg.steps} steps"
    )

    st: dict[str, Any] = {"step": 0, "history": [], "elapsed": 0.0, "loss_sum": 0.0, "loss_steps": 0}
    ckpt = load_checkpoint(checkpoint_dir) if resume and checkpoint_dir else None
    if ckpt is not None:
        if ckpt.get("sharded", False) != sharded:  # their optimizer states differ (by name / by number)
            how = {
                True: "sharded (train.parallel: fsdp under torchrun)",
                False: "unsharded (ddp or one process)",
            }
            raise ValueError(
                f"{checkpoint_dir}: this checkpoint was written by a {how[ckpt.get('sharded', False)]} run; "
                f"resume it the same way (this run is {how[sharded]}, {world} process(es))"
            )
        if sharded:  # the checkpoint's whole weights and optimizer state, sharded onto this rank
            restore_sharded(ckpt, model, optimizer, scheduler=scheduler, scaler=scaler)
        else:
            restore(ckpt, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        st.update({k: ckpt[k] for k in st})
        log(f"resumed from {checkpoint_dir} at step {st['step']}")
    # DDP under torchrun: forward/backward go through it (a sharded model is its own wrapper)
    train_model = model if sharded else data_parallel(model, device)
    run_model = torch.compile(train_model) if cfg.compile else train_model

    def checkpoint() -> None:
        if checkpoint_dir is None:
            return
        states: dict[str, Any] = {"model": model, "optimizer": optimizer}
        if sharded:  # gathered whole (a collective), written by rank 0 like any other checkpoint
            whole, optim = full_state_dict(model, optimizer)
            states = {"model": whole, "optimizer": optim}
        progress = {**st, "sharded": sharded}
        save_checkpoint_from_rank0(checkpoint_dir, progress, **states, scheduler=scheduler, scaler=scaler)

    def make(step: int) -> list[MicroBatch]:
        batches = step_batches(
            data.train, cfg.seed, step, accumulate, cfg.micro_batch, context, me, world, data.train_mask
        )
        if device.type == "cuda":
            batches = [(x.pin_memory(), y.pin_memory()) for x, y in batches]
        return batches

    bar = tqdm(
        total=cfg.steps,
        initial=st["step"],
        desc="pretrain",
        disable=None if cfg.progress and is_main_process() else True,
        leave=False,
        unit="step",
        dynamic_ncols=True,
    )
    model.train()
    # this rank's share of the losses summed since the last evaluation (st["loss_sum"] is all ranks')
    loss_acc = torch.tensor(st["loss_sum"] / world, device=device, dtype=torch.float64)
    t_start = time.perf_counter() - st["elapsed"]
    for step, micro in enumerate(_prefetch(make, st["step"], cfg.steps), start=st["step"]):
        # 1. one optimizer step over its micro-batches
        micro = [(x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in micro]
        loss_acc += lm_step(run_model, micro, amp, scaler, world)
        lr = optimizer_step(optimizer, scheduler, scaler, params, cfg.clip_grad_norm)
        st["step"] = step + 1
        st["loss_steps"] += 1
        bar.update(1)
        if bar.n % 10 == 0 and not bar.disable:  # .item() syncs: only every 10 steps
            bar.set_postfix(loss=f"{float(loss_acc) / st['loss_steps']:.3f}")

        # 2. evaluate and log; 3. checkpoint
        last = st["step"] == cfg.steps
        if st["step"] % cfg.eval_every == 0 or last:
            record: dict[str, float] = {"step": st["step"], "tokens": st["step"] * tokens_per_step, "lr": lr}
            record["train.loss"] = float(all_reduce_sum(loss_acc.clone())) / max(1, st["loss_steps"])
            held_out = evaluate_lm(
                model, data.valid, context, cfg.micro_batch, cfg.eval_batches, amp, data.valid_mask
            )
            if held_out is not None:
                record["valid.loss"] = held_out["loss"]
                record["valid.perplexity"] = held_out["perplexity"]
                record["valid.bpc"] = held_out["loss"] / math.log(2) / data.chars_per_token
            record["time_s"] = time.perf_counter() - t_start
            st["history"].append(record)
            loss_acc.zero_()
            st["loss_steps"] = 0
            log("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
            if on_eval is not None:
                on_eval(record)
        if st["step"] % cfg.checkpoint_every == 0:  # every rank takes part in the sum
            st["loss_sum"] = float(all_reduce_sum(loss_acc.clone()))
        st["elapsed"] = time.perf_counter() - t_start
        if st["step"] % cfg.checkpoint_every == 0 and not last:
            checkpoint()
    bar.close()
    tokens = (st["step"]) * tokens_per_step
    whole = full_state_dict(model)[0] if sharded else None  # for rank 0's bundle
    return LMFitResult(st["history"], st["step"], tokens, st["elapsed"], whole)
