"""Sequence-to-sequence speed and quality: largo's `fit_pairs()` vs a hand-written loop, then decoding.

Data: `largo.data.samples.number_pairs`, English number words → Chinese numerals ("three thousand
seventy-eight" → "三千零七十八"): 3,000 train pairs and 256 test pairs of other numbers, one shared
byte-level BPE (`train_pair_tokenizer`, vocabulary ≤ 1,000) and `encode_pairs`. Model: a
`Seq2SeqTransformer`, dim 128, 2 encoder + 2 decoder layers, 4 heads, dropout 0.1, label smoothing 0.1.
Training uses the seq2seq defaults: batch 32, AdamW lr 5e-4, weight decay 0.01 (not on the embedding and
the norms), 5% warmup + cosine, gradient clipping at 1.0.

1. Training throughput, pairs/s; every variant trains a deep copy of one initialization for one epoch:

    largo        `fit_pairs(model, tokenizer, cfg, tables)`: fit() with length buckets and the per-token
                 loss, no validation split, no checkpoints; timed around the whole call (its encoding of
                 the train pairs included, 2-3% here; printed)
    largo-bf16   the same with train.precision bf16 (autocast)
    hand         a minimal hand-written loop on the same encoded tensors: shuffled index batches, each
                 cut to its longest source and target, loss `model(batch)["nll"].sum() / mean_tokens` per
                 example of the batch, backward, clip, AdamW(fused=True) step, the lr set by hand
    hand-bucket  the same loop fed largo's bucketed order (`epoch_order(..., lengths=...)`): the batches
                 fit() runs, so it must end with fit()'s weights (checked); largo / hand-bucket is the cost
                 of largo's loop itself (goal >= 0.97), largo / hand what a user gets over the hand loop

2. Decoding the 256 test sources in length-sorted batches of 32 (as `Translator.translate` does) with the
model of part 3: tokens/s counts the output tokens (EOS included when it was produced); steps/batch is
the number of decoder passes per batch (counted in an extra, untimed pass): greedy stops when every row
has produced EOS, a beam search when every row has `beams` finished hypotheses that no live one can beat.

    greedy        beam_search(beams=1), which is greedy decoding with the KV cache
    b2, b4        beam search, 2 and 4 beams, with the cache (length penalty 1, early stopping)
    b2-nc, b4-nc  the same without the cache (every step runs the whole prefix again); outputs must equal
                  the cached ones (checked)
    greedy-bf16   greedy with the weights stored in bf16 (`model.to(torch.bfloat16)`); b4-bf16 likewise;
                  the script counts the outputs that differ from fp32's

3. Quality: the model trained by `fit_pairs` for 8 epochs (fp32); the test BLEU (sacrebleu, zh
tokenizer), chrF and exact match of every decoding variant, so the speed ratios come with their quality.

The machine is shared and noisy: every round runs each variant once in a rotated order (after a warm-up),
a fixed matmul ("peak probe") shows how fast the machine was in each round, and the script reports
medians and the median and range of the per-round ratios.

    .venv/bin/python bench/seq2seq.py                  # 3,000 pairs, 5 + 5 rounds (~2-3 min on 2 cores)
    .venv/bin/python bench/seq2seq.py --threads 1      # when other processes hold the cores (2 threads stall)
    .venv/bin/python bench/seq2seq.py --rounds 6 --decode-rounds 5
    .venv/bin/python bench/seq2seq.py --quick          # smoke test: 600 pairs, dim 64, 2 rounds (< 1 min)
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

import pyarrow as pa
import torch
from tokenizers import Tokenizer

from largo.config_seq2seq import Seq2SeqConfig, validate_seq2seq_config
from largo.data.loader import EncodedSplit, epoch_order
from largo.data.pairs import encode_pairs, train_pair_tokenizer
from largo.data.samples import number_pairs
from largo.evaluate.metrics import generation_metrics
from largo.models.seq2seq import Seq2SeqTransformer, beam_search
from largo.train.seq2seq import fit_pairs
from probe import peak_probe

TRAIN_VARIANTS = ("largo", "largo-bf16", "hand", "hand-bucket")
TRAIN_RATIOS = (  # (label, numerator, denominator, note)
    ("largo/hand-bucket", "largo", "hand-bucket", "same batches: the loop's cost"),
    ("largo/hand", "largo", "hand", "vs the shuffled hand loop"),
    ("largo-bf16/largo", "largo-bf16", "largo", "bf16 autocast"),
)
GOAL = 0.97  # largo / hand-bucket
# decoding variant → (beams, use the KV cache, bf16 weights)
DECODE_VARIANTS: dict[str, tuple[int, bool, bool]] = {
    "greedy": (1, True, False),
    "b2": (2, True, False),
    "b2-nc": (2, False, False),
    "b4": (4, True, False),
    "b4-nc": (4, False, False),
    "greedy-bf16": (1, True, True),
    "b4-bf16": (4, True, True),
}
DECODE_RATIOS = (
    ("b2/b2-nc", "b2", "b2-nc", "KV cache, 2 beams"),
    ("b4/b4-nc", "b4", "b4-nc", "KV cache, 4 beams"),
    ("b2/greedy", "b2", "greedy", "cost of 2 beams"),
    ("b4/greedy", "b4", "greedy", "cost of 4 beams"),
    ("greedy-bf16/greedy", "greedy-bf16", "greedy", "bf16 weights, greedy"),
    ("b4-bf16/b4", "b4-bf16", "b4", "bf16 weights, 4 beams"),
)
DECODE_BATCH = 32
SIZES = {
    "full": {"pairs": 3000, "test": 256, "dim": 128, "rounds": 5, "decode_rounds": 5, "epochs": 8},
    "quick": {"pairs": 600, "test": 64, "dim": 64, "rounds": 2, "decode_rounds": 2, "epochs": 6},
}


# ------------------------------------------------------------------------------------------- data


def make_config(dim: int, epochs: int) -> Seq2SeqConfig:
    """The run config: the seq2seq defaults, a small model, CPU, no progress bar, no decoding per epoch."""
    return validate_seq2seq_config(
        {
            "data": {"train": "unused.tsv", "source": "english", "target": "chinese", "valid": None},
            "tokenizer": {"vocab_size": 1000, "max_source_length": 32, "max_target_length": 24},
            "model": {"dim": dim, "encoder_layers": 2, "decoder_layers": 2, "heads": 4},
            "train": {
                "epochs": epochs,
                "device": "cpu",
                "progress": False,
                "eval_generate": 0,
            },
        }
    )


def with_vocab(cfg: Seq2SeqConfig, vocab_size: int) -> Seq2SeqConfig:
    """The config with the model's vocabulary and context filled in (as `train_seq2seq` does)."""
    t = cfg.tokenizer
    context = max(t.max_source_length, t.max_target_length)
    model = cfg.model.model_copy(update={"vocab_size": vocab_size, "context": context})
    return cfg.model_copy(update={"model": model})


def with_train(cfg: Seq2SeqConfig, **update: object) -> Seq2SeqConfig:
    """The config with some train.* keys changed."""
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=update)})


def pair_tables(n_train: int, n_test: int) -> dict[str, pa.Table]:
    """Distinct numbers as {'train', 'valid' (empty), 'test'} tables of english → chinese."""
    rows = number_pairs(n_train + n_test, seed=0)
    table = pa.Table.from_pylist(rows)
    return {"train": table.slice(0, n_train), "valid": table.slice(0, 0), "test": table.slice(n_train)}


def _quiet() -> contextlib.AbstractContextManager:
    """Swallow fit()'s per-epoch log line (stderr)."""
    return contextlib.redirect_stderr(io.StringIO())


# ----------------------------------------------------------------------------------------- epochs


def hand_epoch(
    model: Seq2SeqTransformer, data: EncodedSplit, cfg: Seq2SeqConfig, order: torch.Tensor
) -> None:
    """One epoch of a minimal hand-written loop over `order`, with fit()'s objective and optimizer."""
    t = cfg.train
    source, target = data.inputs["source"], data.inputs["target"]
    src_len, tgt_len = data.lengths["source"], data.lengths["target"]
    mean_tokens = max(1.0, float(data.targets["tokens"].double().mean()))
    n, bs = len(source), t.batch_size
    # weight decay on the matrices only, not on the (tied) embedding or the norm scales
    decay = [p for p in model.parameters() if p.ndim >= 2 and p is not model.embed.weight]
    rest = [p for p in model.parameters() if p.ndim < 2 or p is model.embed.weight]
    groups = [
        {"params": decay, "weight_decay": t.optimizer.weight_decay},
        {"params": rest, "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=t.optimizer.lr, betas=tuple(t.optimizer.betas), fused=True)
    steps = math.ceil(n / bs)
    warmup = int(t.schedule.warmup * steps)
    torch.manual_seed(t.seed)  # dropout draws as in fit()
    model.train()
    for step, lo in enumerate(range(0, n, bs)):
        s = step - warmup  # linear warmup, then cosine to 0
        lr_factor = (
            (step + 1) / (warmup + 1) if s < 0 else 0.5 * (1 + math.cos(math.pi * s / max(1, steps - warmup)))
        )
        for g in opt.param_groups:
            g["lr"] = t.optimizer.lr * lr_factor
        idx = order[lo : lo + bs]
        batch = {
            "source": source[idx, : int(src_len[idx].max())],
            "target": target[idx, : int(tgt_len[idx].max())],
        }
        loss = model(batch)["nll"].sum() / mean_tokens
        (loss * (1.0 / len(idx))).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)


def train_runners(
    cfg: Seq2SeqConfig, tokenizer: Tokenizer, tables: dict[str, pa.Table], data: EncodedSplit
) -> dict[str, Callable[[Seq2SeqTransformer], None]]:
    """Each training variant as model → one epoch on the train pairs (see the module docstring)."""
    n, seed, bs = len(data), cfg.train.seed, cfg.train.batch_size
    shuffled = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    bucketed = epoch_order(n, seed, 0, lengths=data.sort_key(), batch_size=bs)
    bf16 = with_train(cfg, precision="bf16")

    def largo(model: Seq2SeqTransformer, c: Seq2SeqConfig = cfg) -> None:
        with _quiet():
            fit_pairs(model, tokenizer, c, tables)

    return {
        "largo": largo,
        "largo-bf16": lambda m: largo(m, bf16),
        "hand": lambda m: hand_epoch(m, data, cfg, shuffled),
        "hand-bucket": lambda m: hand_epoch(m, data, cfg, bucketed),
    }


# ------------------------------------------------------------------------------------------ rounds


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def interleaved(
    variants: tuple[str, ...] | list[str], run: Callable[[str], float], rounds: int, unit: str
) -> tuple[dict[str, list[float]], list[float]]:
    """`rounds` rounds of `run(variant)` → rate, each round in a rotated order; rates and peak probes."""
    rates: dict[str, list[float]] = {v: [] for v in variants}
    probes: list[float] = []
    for r in range(rounds):
        probes.append(peak_probe())
        for v in list(variants[r % len(variants) :]) + list(variants[: r % len(variants)]):
            rates[v].append(run(v))
        shown = "  ".join(f"{v}={rates[v][-1]:,.0f}" for v in variants)
        print(
            f"  round {r + 1}: {shown} {unit}   probe {probes[-1]:.0f} GFLOP/s   load {_load():.1f}",
            flush=True,
        )
    return rates, probes


def ratio_lines(rates: dict[str, list[float]], pairs: tuple) -> dict[str, float]:
    """Print the per-round ratios of each pair (median [min..max] and the values); return the medians."""
    medians = {}
    for label, a, b, note in pairs:
        xs = [x / y for x, y in zip(rates[a], rates[b], strict=True)]
        medians[label] = statistics.median(xs)
        print(
            f"{label:<19} {'(' + note + ')':<32} median {medians[label]:.3f}  "
            f"[{min(xs):.3f}..{max(xs):.3f}]  rounds {' '.join(f'{x:.3f}' for x in xs)}"
        )
    return medians


def probe_line(probes: list[float]) -> str:
    """The peak probes' median and spread, with a hint when the machine's speed swung widely."""
    p = probes
    spread = (max(p) - min(p)) / statistics.median(p)  # of the machine's speed while measuring
    middle = statistics.median(p)
    line = f"peak probe {middle:.0f} GFLOP/s (min {min(p):.0f}, max {max(p):.0f}; spread {spread:.0%})"
    if spread > 0.5 and torch.get_num_threads() > 1:
        line += "\n  note: the machine's speed swung widely; other processes hold the cores: try --threads 1"
    return line


# ------------------------------------------------------------------------------------------ parts


@torch.no_grad()
def max_weight_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    """Largest absolute difference between the parameters of two copies of one model."""
    return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def train_part(
    cfg: Seq2SeqConfig, tokenizer: Tokenizer, tables: dict, model0: Seq2SeqTransformer, rounds: int
) -> dict:
    """Part 1: interleaved one-epoch rounds of every training variant; prints the table and ratios."""
    data = encode_pairs(tables["train"], cfg, tokenizer, "train", print)
    n = len(data)
    runners = train_runners(cfg, tokenizer, tables, data)
    warm = {k: v.slice(0, 256) for k, v in tables.items()}
    warm_runners = train_runners(
        cfg, tokenizer, warm, encode_pairs(warm["train"], cfg, tokenizer, "warm", print)
    )
    for v in TRAIN_VARIANTS:  # warm-up: allocator, kernels, lazy imports
        warm_runners[v](copy.deepcopy(model0))
    encode_s = []
    for _ in range(3):  # fit_pairs encodes the train split inside largo's time: how long that takes
        t = time.perf_counter()
        encode_pairs(tables["train"], cfg, tokenizer, "train", print)
        encode_s.append(time.perf_counter() - t)
    last: dict[str, Seq2SeqTransformer] = {}

    def run(v: str) -> float:
        model = copy.deepcopy(model0)
        t0 = time.perf_counter()
        runners[v](model)
        rate = n / (time.perf_counter() - t0)
        last[v] = model
        return rate

    src, tgt = data.lengths["source"].float(), data.lengths["target"].float()
    steps = math.ceil(n / cfg.train.batch_size)
    print(
        f"\n== TRAINING: {n:,} pairs, {steps} steps of batch {cfg.train.batch_size}, "
        f"source {src.mean():.1f} / target {tgt.mean():.1f} tokens on average (BOS, EOS included), "
        f"{rounds} rounds of 1 epoch"
    )
    rates, probes = interleaved(TRAIN_VARIANTS, run, rounds, "pairs/s")
    print(f"\n{'variant':<13} {'median pairs/s':>15} {'min':>8} {'max':>8} {'ms/step':>8}")
    for v in TRAIN_VARIANTS:
        xs = rates[v]
        ms = 1000 * n / statistics.median(xs) / steps
        print(f"{v:<13} {statistics.median(xs):>15,.0f} {min(xs):>8,.0f} {max(xs):>8,.0f} {ms:>8.1f}")
    print(probe_line(probes))
    medians = ratio_lines(rates, TRAIN_RATIOS)
    diff = max_weight_diff(last["largo"], last["hand-bucket"])
    print(f"same batches → same weights: largo vs hand-bucket max |Δw| = {diff:.1e}")
    enc = statistics.median(encode_s)
    xs = [n / (n / a - enc) / b for a, b in zip(rates["largo"], rates["hand-bucket"], strict=True)]
    print(
        f"encode_pairs of the train split (inside largo's time): {1000 * enc:.0f} ms; without it "
        f"largo/hand-bucket would be {statistics.median(xs):.3f} [{min(xs):.3f}..{max(xs):.3f}]"
    )
    return {"medians": medians, "diff": diff, "no_encode": statistics.median(xs)}


def decode_all(
    model: Seq2SeqTransformer, source: torch.Tensor, lengths: torch.Tensor, variant: str, limit: int
) -> list[list[int]]:
    """Decode every source in length-sorted batches (as Translator.translate); outputs in input order."""
    beams, use_cache, _ = DECODE_VARIANTS[variant]
    order = torch.argsort(lengths, descending=True, stable=True).tolist()
    out: list[list[int]] = [[] for _ in order]
    for lo in range(0, len(order), DECODE_BATCH):
        index = order[lo : lo + DECODE_BATCH]
        batch = source[index, : int(lengths[index].max())]
        rows = beam_search(model, batch, limit, beams, 1.0, early_stopping=True, use_cache=use_cache)
        for i, row in zip(index, rows, strict=True):
            out[i] = row
    return out


def decoder_steps(model: Seq2SeqTransformer, run: Callable[[], object]) -> int:
    """How many decoder forward passes `run()` makes (a hook on the decoder's final norm counts them)."""
    calls = 0

    def count(*_: object) -> None:
        nonlocal calls
        calls += 1

    handle = model.dec_norm.register_forward_hook(count)
    try:
        run()
    finally:
        handle.remove()
    return calls


def decode_part(
    cfg: Seq2SeqConfig, tokenizer: Tokenizer, model: Seq2SeqTransformer, test: pa.Table, rounds: int
) -> dict:
    """Parts 2 and 3: interleaved decoding rounds, then the quality of each variant's outputs."""
    data = encode_pairs(test, cfg, tokenizer, "test", print)
    source, lengths = data.inputs["source"], data.lengths["source"]
    limit = cfg.max_new_tokens
    fp32 = model.eval()
    bf16 = copy.deepcopy(model).to(torch.bfloat16).eval()
    models = {v: bf16 if DECODE_VARIANTS[v][2] else fp32 for v in DECODE_VARIANTS}
    outputs: dict[str, list[list[int]]] = {}
    for v in DECODE_VARIANTS:  # warm-up
        decode_all(models[v], source[:DECODE_BATCH], lengths[:DECODE_BATCH], v, limit)

    def run(v: str) -> float:
        t0 = time.perf_counter()
        outputs[v] = decode_all(models[v], source, lengths, v, limit)
        elapsed = time.perf_counter() - t0
        return sum(min(len(o) + 1, limit) for o in outputs[v]) / elapsed  # + the EOS when it came

    print(
        f"\n== DECODING: {len(source)} test sources, batches of {DECODE_BATCH} sorted by length, "
        f"up to {limit} new tokens, length penalty 1, {rounds} rounds"
    )
    variants = list(DECODE_VARIANTS)
    rates, probes = interleaved(variants, run, rounds, "tok/s")
    references = [str(x) for x in test.column("chinese").to_pylist()]
    batches = math.ceil(len(source) / DECODE_BATCH)
    print(
        f"\n{'variant':<12} {'median tok/s':>12} {'min':>8} {'max':>8} {'sources/s':>10} {'tokens':>7} "
        f"{'steps/batch':>11} {'BLEU':>6} {'chrF':>6} {'exact':>6}"
    )
    for v in variants:
        xs = rates[v]
        tokens = sum(min(len(o) + 1, limit) for o in outputs[v])
        steps = decoder_steps(models[v], lambda v=v: decode_all(models[v], source, lengths, v, limit))
        scores = generation_metrics([tokenizer.decode(o) for o in outputs[v]], references)
        print(
            f"{v:<12} {statistics.median(xs):>12,.0f} {min(xs):>8,.0f} {max(xs):>8,.0f} "
            f"{statistics.median(xs) * len(source) / tokens:>10,.1f} {tokens:>7} {steps / batches:>11.1f} "
            f"{scores['bleu']:>6.1f} {scores['chrf']:>6.1f} {scores['exact_match']:>6.3f}"
        )
    print(probe_line(probes))
    medians = ratio_lines(rates, DECODE_RATIOS)
    checks = {}
    for a, b in (("b2", "b2-nc"), ("b4", "b4-nc"), ("greedy", "greedy-bf16"), ("b4", "b4-bf16")):
        differ = sum(x != y for x, y in zip(outputs[a], outputs[b], strict=True))
        checks[f"{a} vs {b}"] = differ
        verdict = "identical" if not differ else f"{differ} of {len(source)} outputs differ"
        print(f"outputs {a} vs {b}: {verdict}")
    return {"medians": medians, "checks": checks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=0, help="training rounds (0: 5, quick 2)")
    parser.add_argument("--decode-rounds", type=int, default=0, help="decoding rounds (0: 5, quick 2)")
    parser.add_argument("--epochs", type=int, default=0, help="epochs of the decoded model (0: 8, quick 6)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 600 pairs, dim 64, 2 rounds")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    size = SIZES["quick" if args.quick else "full"]
    rounds, decode_rounds = args.rounds or size["rounds"], args.decode_rounds or size["decode_rounds"]
    epochs = args.epochs or size["epochs"]
    t_start = time.perf_counter()
    tables = pair_tables(size["pairs"], size["test"])
    cfg = make_config(size["dim"], epochs=1)
    tokenizer = train_pair_tokenizer(tables["train"], cfg)
    cfg = with_vocab(cfg, tokenizer.get_vocab_size())
    torch.manual_seed(cfg.train.seed)
    model0 = Seq2SeqTransformer(cfg.model, cfg.train.label_smoothing)
    m = cfg.model
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus, "
        f"load {_load():.1f}\n"
        f"model: dim {m.dim}, {m.encoder_layers}+{m.decoder_layers} layers, {m.heads} heads, vocabulary "
        f"{m.vocab_size:,}, context {m.context}: {model0.num_parameters():,} parameters"
    )
    if _load() > (os.cpu_count() or 1) - 0.5 and torch.get_num_threads() > 1:
        print(
            "  note: other processes are using the CPUs; with 2 threads a busy core can stall an epoch "
            "10x (OpenMP spin-waits), so compare rounds, or try --threads 1"
        )
    train = train_part(cfg, tokenizer, tables, model0, rounds)

    model = copy.deepcopy(model0)
    t = time.perf_counter()
    with _quiet():
        fit_pairs(model, tokenizer, with_train(cfg, epochs=epochs), tables)
    print(f"\ntrained the decoded model: {epochs} epochs of largo fp32 in {time.perf_counter() - t:.0f} s")
    decode = decode_part(cfg, tokenizer, model, tables["test"], decode_rounds)

    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    tm, dm = train["medians"], decode["medians"]
    verdict = "ok" if tm["largo/hand-bucket"] >= GOAL else "BELOW GOAL"
    print(
        f"TRAINING: largo/hand-bucket = {tm['largo/hand-bucket']:.3f}x (goal >= {GOAL}) {verdict}, "
        f"{train['no_encode']:.3f}x without fit_pairs' encoding; "
        f"largo/hand = {tm['largo/hand']:.3f}x; bf16/fp32 = {tm['largo-bf16/largo']:.3f}x"
    )
    same = all(decode["checks"][k] == 0 for k in ("b2 vs b2-nc", "b4 vs b4-nc"))
    print(
        f"DECODING: KV cache {dm['b2/b2-nc']:.2f}x (2 beams), {dm['b4/b4-nc']:.2f}x (4 beams), "
        f"{'same outputs' if same else 'OUTPUTS DIFFER'}; 4 beams cost {1 / dm['b4/greedy']:.2f}x "
        f"greedy's time per token; bf16 weights {dm['greedy-bf16/greedy']:.2f}x (greedy), "
        f"{dm['b4-bf16/b4']:.2f}x (4 beams)"
    )


if __name__ == "__main__":
    main()
