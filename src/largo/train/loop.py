"""The training loop: `fit()` reads top to bottom, `train_step()` is one micro-batch.

fit: build optimizer and schedule → resume if asked → for each epoch: train steps (autocast,
backward, accumulate, clip, step, schedule) → validate → log → checkpoint → early stop.
Extension points are explicit arguments (`score_fn`, `model_score_fn`, `transform`, `on_epoch_end`), not
callbacks found at run time.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from largo.config import TrainConfig
from largo.data.loader import Batch, EncodedSplit, batch_bounds, epoch_order, take_batch
from largo.train.checkpoint import load_checkpoint, restore, save_checkpoint_from_rank0, seed_everything
from largo.train.distributed import (
    all_reduce_sum,
    broadcast_object,
    data_parallel,
    group_rank_and_size,
    is_main_process,
    log,
    pick_device,
    sync_gradients,
)
from largo.train.losses import LossFn
from largo.train.optim import build_optimizer, build_schedule, penalized_params

_SHOWN = (
    "epoch",
    "train.loss",
    "valid.loss",
    "valid.accuracy",
    "valid.f1_macro",
    "valid.mae",
    "valid.r2",
    "valid.chrf",
    "lr",
    "time_s",
)
ScoreFn = Callable[[dict[str, torch.Tensor]], dict[str, float]]
ModelScoreFn = Callable[[nn.Module], dict[str, float]]


@dataclass
class FitResult:
    """What a finished `fit()` reports."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int | None = None
    stopped_early: bool = False
    steps: int = 0
    train_time_s: float = 0.0


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context for a precision ('fp32' → no autocast)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def forward_in_batches(
    model: nn.Module,
    inputs: Batch,
    batch_size: int,
    precision: str = "fp32",
    pad: dict[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Run the model in eval mode over all examples; outputs float32 on the CPU, in input order.

    `pad` names the sequence inputs and their padding ids: examples then run sorted by length and
    each batch is cut to its longest row, so short texts do not pay for long ones.
    """
    model.eval()
    device = next(model.parameters()).device
    n = int(next(iter(inputs.values())).shape[0])
    split = EncodedSplit(inputs, {}, pad or {})
    key = split.sort_key()
    order = torch.argsort(key, descending=True, stable=True) if key is not None else torch.arange(n)
    chunks: dict[str, list[torch.Tensor]] = {}
    for lo in range(0, n, batch_size):
        index = order[lo : lo + batch_size]
        if key is None:  # no sequences: slices are views, no gather needed
            batch = {k: v[lo : lo + batch_size] for k, v in inputs.items()}
        else:
            batch, _ = split.take(index, split.longest(index))
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast(device, precision):
            out = model(batch)
        for k, v in out.items():
            chunks.setdefault(k, []).append(v.float().cpu())
    outputs = {k: torch.cat(v) for k, v in chunks.items()}
    if key is None:
        return outputs
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(n)
    return {k: v[inverse] for k, v in outputs.items()}


def train_step(
    model: nn.Module,
    inputs: Batch,
    targets: Batch,
    loss_fn: LossFn,
    scale: float,
    amp: Any,
    penalty: Callable[[], torch.Tensor] | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    """Forward and backward one micro-batch; returns its summed loss (detached, no host sync).

    `scale` is 1 / examples in the whole optimizer step, so accumulated gradients equal one big batch.
    `scaler` (fp16) multiplies the loss so small gradients do not underflow.
    """
    with amp:
        loss_sum = loss_fn(model(inputs), targets)
    total = loss_sum
    if penalty is not None:  # the penalty counts once per step: b/N of it per micro-batch
        total = total + penalty() * len(next(iter(targets.values())))
    loss = total * scale
    if scaler is not None and scaler.is_enabled():
        loss = scaler.scale(loss)
    loss.backward()
    return loss_sum.detach()


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    params: list[nn.Parameter],
    clip_grad_norm: float | None,
) -> float:
    """One optimizer step on the accumulated gradients: unscale (fp16), clip, step, schedule, zero.
    Returns the learning rate the step used (for the log)."""
    if scaler.is_enabled():
        scaler.unscale_(optimizer)
    if clip_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    lr = optimizer.param_groups[0]["lr"]
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return lr


def _penalty_fn(model: nn.Module, l1: float, l2: float) -> Callable[[], torch.Tensor] | None:
    if l1 == 0 and l2 == 0:
        return None
    params = penalized_params(model)

    def penalty() -> torch.Tensor:
        total = torch.zeros((), device=params[0].device)
        for p in params:
            if l1:
                total = total + l1 * p.abs().sum()
            if l2:
                total = total + l2 * p.pow(2).sum()
        return total

    return penalty


def _improved(value: float, best: float | None, minimize: bool, min_delta: float) -> bool:
    if best is None:
        return True
    return value < best - min_delta if minimize else value > best + min_delta


def _clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def fit(
    model: nn.Module,
    train: EncodedSplit,
    valid: EncodedSplit | None,
    cfg: TrainConfig,
    loss_fn: LossFn,
    *,
    score_fn: ScoreFn | None = None,
    model_score_fn: ModelScoreFn | None = None,
    transform: Callable[[Batch, torch.Generator], Batch] | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    on_epoch_end: Callable[[dict[str, float]], None] | None = None,
) -> FitResult:
    """Train `model` in place on `train`, validating on `valid` after every epoch.

    Args:
        model: the model; moved to the configured device.
        train, valid: encoded splits (valid may be None: no validation metrics, no early stopping).
        cfg: the train section of the config.
        loss_fn: summed loss over a batch (see `losses.make_loss_fn`).
        score_fn: validation outputs → metrics ({"accuracy": …}); logged as valid.<name> (a "loss"
            replaces the loop's own valid.loss, a per-example mean of loss_fn).
        model_score_fn: the validated model (the averaged one with train.ema) → metrics that need the
            model itself, e.g. decoding outputs; logged as valid.<name>.
        transform: (inputs, generator) → inputs, e.g. augmentation; seeded per batch for exact resume.
        checkpoint_dir: where last.pt goes; None disables checkpoints.
        resume: continue from checkpoint_dir/last.pt when it exists.
        on_epoch_end: called with each epoch's log record.

    Returns:
        FitResult with the per-epoch history; the model holds the best weights when early stopping
        is on, else the last.
    """
    seed_everything(cfg.seed + group_rank_and_size()[0])  # dropout differs by rank, the data do not
    device = pick_device(cfg.device)
    with deterministic_kernels(cfg.deterministic and device.type != "cpu"):
        return _fit(
            model,
            train,
            valid,
            cfg,
            loss_fn,
            device,
            score_fn,
            model_score_fn,
            transform,
            checkpoint_dir,
            resume,
            on_epoch_end,
        )


@contextlib.contextmanager
def deterministic_kernels(enabled: bool) -> Iterator[None]:
    """Use only deterministic GPU kernels inside the block (cuBLAS needs a fixed workspace for that)."""
    if not enabled:
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def _fit(
    model: nn.Module,
    train: EncodedSplit,
    valid: EncodedSplit | None,
    cfg: TrainConfig,
    loss_fn: LossFn,
    device: torch.device,
    score_fn: ScoreFn | None,
    model_score_fn: ModelScoreFn | None,
    transform: Callable[[Batch, torch.Generator], Batch] | None,
    checkpoint_dir: str | Path | None,
    resume: bool,
    on_epoch_end: Callable[[dict[str, float]], None] | None,
) -> FitResult:
    """The body of fit() once the device is chosen (fit() wraps it in the determinism setting)."""
    me, world = group_rank_and_size()
    model.to(device)
    train = train.to(device)
    valid_inputs = valid.inputs if valid is not None and len(valid) else None
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    bounds = batch_bounds(len(train), cfg.batch_size, drop_singleton=has_bn)
    span = cfg.accumulate * world  # batches per optimizer step, over all ranks
    steps_per_epoch = math.ceil(len(bounds) / span)
    optimizer = build_optimizer(model, cfg.optimizer, device)
    scheduler = build_schedule(optimizer, cfg.schedule, steps_per_epoch * cfg.epochs, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    amp = autocast(device, cfg.precision)
    penalty = _penalty_fn(model, cfg.l1, cfg.l2)
    params = [p for p in model.parameters() if p.requires_grad]
    # the averaged weights (buffers too: norm statistics follow the average) that validation, early
    # stopping and the result use; the optimizer keeps stepping the raw weights
    ema = None
    if cfg.ema is not None:
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
    judged = ema.module if ema is not None else model
    es = cfg.early_stopping
    lengths = train.sort_key() if cfg.length_buckets else None  # bucketing by text length

    # 1. the loop's state: everything a resumed run needs to continue exactly
    st: dict[str, Any] = {
        "epoch": 0,
        "batch": 0,
        "step": 0,
        "history": [],
        "best_value": None,
        "best_loss": None,  # valid.loss of the best epoch: breaks ties of the early-stopping metric
        "best_epoch": None,
        "bad_epochs": 0,
        "stopped": False,
        "best_model": None,
        "loss_sum": 0.0,
        "examples": 0,
        "elapsed": 0.0,
    }
    ckpt = load_checkpoint(checkpoint_dir) if resume and checkpoint_dir else None
    if ckpt is not None:
        restore(ckpt, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, ema=ema)
        st.update({k: ckpt[k] for k in st if k in ckpt})  # (checkpoints before best_loss lack it)
        where = f"epoch {st['epoch'] + 1}, batch {st['batch']}, step {st['step']}"
        log(f"resumed from {checkpoint_dir} at {where}")
    # under DDP the forward/backward runs through the wrapper (it all-reduces gradients once per step);
    # validation and the optimizer use the model itself
    step_model = data_parallel(model, device)

    def checkpoint() -> None:
        if checkpoint_dir is None:
            return
        save_checkpoint_from_rank0(
            checkpoint_dir, st, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, ema=ema
        )

    t_start = time.perf_counter() - st["elapsed"]
    last_lr = optimizer.param_groups[0]["lr"]
    for epoch in range(st["epoch"], cfg.epochs):
        if st["stopped"]:
            break
        # 2. train: the epoch's order depends only on (seed, epoch), so a resume continues it
        model.train()
        order = epoch_order(len(train), cfg.seed, epoch, lengths=lengths, batch_size=cfg.batch_size)
        on_device = order.to(device)
        batch_transform = None
        if transform is not None:

            def batch_transform(inputs: Batch, i: int, epoch: int = epoch) -> Batch:
                g = torch.Generator().manual_seed(cfg.seed * 7_919 + epoch * 100_003 + i)
                return transform(inputs, g)

        # float64 keeps the epoch's loss sum exact over many batches (MPS has no float64); this rank's
        # share of the sums (st holds all ranks')
        acc_dtype = torch.float32 if device.type == "mps" else torch.float64
        loss_sum = torch.tensor(st["loss_sum"] / world, device=device, dtype=acc_dtype)
        examples = torch.tensor(st["examples"] / world, device=device, dtype=acc_dtype)
        bar = tqdm(
            total=len(bounds),
            initial=st["batch"],
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=None if cfg.progress and is_main_process() else True,
            leave=False,
            unit="batch",
            dynamic_ncols=True,
        )
        t_epoch, seen_this_session = time.perf_counter(), 0
        for first in range(st["batch"], len(bounds), span):
            # one optimizer step's batches: [first, first + span), this rank's `accumulate` of them (a
            # rank left without one in a short last group runs one at weight 0, to join the all-reduce)
            group = range(first, min(first + span, len(bounds)))
            step_examples = sum(bounds[i][1] - bounds[i][0] for i in group)
            mine = [i for i in group if (i - first) // cfg.accumulate == me]
            weight = world / step_examples if mine else 0.0
            for k, i in enumerate(mine or [first]):
                lo, hi = bounds[i]
                inputs, targets = take_batch(train, order, bounds, i, batch_transform, on_device)
                with sync_gradients(step_model, now=k == max(0, len(mine) - 1)):
                    loss = train_step(step_model, inputs, targets, loss_fn, weight, amp, penalty, scaler)
                if mine:
                    loss_sum += loss
                    examples += hi - lo
                    seen_this_session += hi - lo
                bar.update(1)
            # 3. one optimizer step: unscale, clip, step, schedule, zero
            last_lr = optimizer_step(optimizer, scheduler, scaler, params, cfg.clip_grad_norm)
            if ema is not None:
                ema.update_parameters(model)
            st["step"] += 1
            st["batch"] = group.stop
            if cfg.checkpoint.every_steps and st["step"] % cfg.checkpoint.every_steps == 0:
                st["loss_sum"], st["examples"] = all_reduce_sum(torch.stack([loss_sum, examples])).tolist()
                st["elapsed"] = time.perf_counter() - t_start
                checkpoint()
            if st["step"] % 20 == 0 and not bar.disable:  # .item() syncs: only every 20 steps
                rate = seen_this_session / max(1e-9, time.perf_counter() - t_epoch)
                bar.set_postfix(loss=f"{float(loss_sum / examples.clamp(min=1)):.4f}", ex_s=f"{rate:,.0f}")
        bar.close()
        st["loss_sum"], st["examples"] = all_reduce_sum(torch.stack([loss_sum, examples])).tolist()

        # 4. validate and log
        record: dict[str, float] = {
            "epoch": epoch + 1,
            "step": st["step"],
            "lr": last_lr,
            "train.loss": st["loss_sum"] / max(1, st["examples"]),
        }
        if valid_inputs is not None and is_main_process():
            outputs = forward_in_batches(judged, valid_inputs, cfg.eval_batch_size, cfg.precision, valid.pad)
            with torch.no_grad():
                vloss = loss_fn(outputs, {k: v.cpu() for k, v in valid.targets.items()})
            record["valid.loss"] = float(vloss) / len(valid)
            if score_fn is not None:
                record.update({f"valid.{k}": v for k, v in score_fn(outputs).items()})
            if model_score_fn is not None:
                record.update({f"valid.{k}": v for k, v in model_score_fn(judged).items()})
        record["time_s"] = time.perf_counter() - t_start
        # rank 0 validates; every rank takes its figures, so early stopping decides the same everywhere
        record = broadcast_object(record)
        st["history"].append(record)
        log(
            "  ".join(
                f"{k}={record[k]:.4g}" if isinstance(record[k], float) else f"{k}={record[k]}"
                for k in _SHOWN
                if k in record
            )
        )

        # 5. early stopping: remember the best weights, stop after `patience` epochs without gain. A tie
        # of a counted metric (F1, accuracy: a saturated 1.0 or the same count of right answers) goes to
        # the lower valid loss, so training does not stop on the first, least confident, epoch to reach it
        if es is not None and es.metric in record:
            tie = record[es.metric] == st["best_value"] and es.metric != "valid.loss"
            lower_loss = st["best_loss"] is not None and record.get("valid.loss", math.inf) < st["best_loss"]
            if _improved(record[es.metric], st["best_value"], es.minimize, es.min_delta) or (
                tie and lower_loss
            ):
                st.update(
                    best_value=record[es.metric],
                    best_loss=record.get("valid.loss"),
                    best_epoch=epoch + 1,
                    bad_epochs=0,
                    best_model=_clone_state(judged),
                )
            else:
                st["bad_epochs"] += 1
                st["stopped"] = st["bad_epochs"] >= es.patience
        elif es is not None:
            log(f"warning: early-stopping metric {es.metric} is undefined this epoch; epoch not counted")
        st.update(epoch=epoch + 1, batch=0, loss_sum=0.0, examples=0, elapsed=time.perf_counter() - t_start)
        checkpoint()
        if on_epoch_end is not None:
            on_epoch_end(record)
        if st["stopped"]:
            log(f"early stopping: no {es.metric} gain in {es.patience} epochs; best epoch {st['best_epoch']}")

    if st["best_model"] is not None:
        model.load_state_dict(st["best_model"])
    elif ema is not None:
        model.load_state_dict(ema.module.state_dict())
    return FitResult(st["history"], st["best_epoch"], bool(st["stopped"]), st["step"], st["elapsed"])
