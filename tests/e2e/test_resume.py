"""A run killed with SIGKILL at a random step resumes to exactly the weights of an uninterrupted run."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from largo.data.samples import write_news_csv, write_number_pairs

# The child wraps train_step (test-side only) to print a line per micro-batch and slow down a little,
# so the parent can kill it at a chosen micro-batch; the wrapper does not change any result.
CHILD = textwrap.dedent(
    """
    import sys, time
    from largo.train import loop  # (largo.train the function shadows the package for `import a.b as c`)

    original, count = loop.train_step, 0

    def counted(*args, **kwargs):
        global count
        out = original(*args, **kwargs)
        count += 1
        print(f"batch {count}", flush=True)
        time.sleep(0.004)
        return out

    loop.train_step = counted
    import largo
    largo.train(sys.argv[1], resume=sys.argv[2] == "resume")
    print("finished", flush=True)
    """
)


IMAGE = {"name": "image", "type": "image", "encoder": "cnn", "augment": {"crop": 1, "rotate": 10}}
# a text input: the tokenizer is read back from the bundle and batches come in length buckets
TEXT = {
    "name": "text",
    "type": "text",
    "tokenizer": {"kind": "bpe", "vocab_size": 2000},
    "encoder": {"kind": "rnn", "cell": "lstm", "dim": 32, "hidden": 32},
}


def _config(data: Path, runs: Path, accumulate: int, feature: dict = IMAGE) -> dict:
    return {
        "name": "resume",
        "runs_dir": str(runs),
        "data": {"train": str(data), "valid": 0.1, "test": 0.1},
        "inputs": [feature],
        "outputs": [{"name": "label", "type": "category"}],
        "model": {"hidden": [32], "dropout": 0.3},
        "train": {
            "epochs": 3,
            "batch_size": 48,
            "accumulate": accumulate,
            "optimizer": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.01},
            "schedule": {"name": "cosine", "warmup": 0.1},
            "early_stopping": {"metric": "valid.accuracy", "patience": 5},
            "clip_grad_norm": 1.0,
            "checkpoint": {"every_steps": 4, "keep": True},
            "deterministic": True,  # needed on GPUs (cuDNN, atomics); CPU kernels are deterministic anyway
        },
    }


def _seq2seq_config(data: Path, runs: Path, accumulate: int) -> dict:
    """An encoder-decoder on number pairs: the same loop, a tokenizer fit on both columns, and greedy
    decoding scores in every epoch's record."""
    return {
        "task": "seq2seq",
        "name": "resume",
        "runs_dir": str(runs),
        "data": {"train": str(data), "source": "english", "target": "chinese", "valid": 0.1, "test": 0.05},
        "tokenizer": {"vocab_size": 300, "max_source_length": 24, "max_target_length": 16},
        "model": {"dim": 32, "encoder_layers": 1, "decoder_layers": 1, "heads": 2, "dropout": 0.1},
        "train": {
            "epochs": 3,
            "batch_size": 32,
            "accumulate": accumulate,
            "optimizer": {"name": "adamw", "lr": 2e-3},
            "schedule": {"name": "cosine", "warmup": 0.1},
            "early_stopping": {"metric": "valid.chrf", "patience": 5},
            "clip_grad_norm": 1.0,
            "checkpoint": {"every_steps": 4, "keep": True},
            "eval_generate": 40,
            "deterministic": True,
        },
        "decode": {"beams": 2},
    }


def _run(script: Path, cfg: Path, mode: str, kill_at: int | None) -> tuple[int, int]:
    """Run the child; kill it with SIGKILL after `kill_at` micro-batches. Returns (returncode, batches)."""
    proc = subprocess.Popen(
        [sys.executable, str(script), str(cfg), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    seen = 0
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("batch"):
            seen += 1
            if kill_at is not None and seen == kill_at:
                proc.kill()
                break
    proc.wait(timeout=300)
    return proc.returncode, seen


def _checkpoint_position(run: Path) -> tuple[int, int, int]:
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    return state["epoch"], state["batch"], state["step"]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "accumulate"), [("image", 1), ("image", 2), ("text", 1), ("seq2seq", 2)])
def test_sigkill_resume_gives_identical_weights(
    digits_folder: Path, tmp_path: Path, kind: str, accumulate: int
) -> None:
    rng = random.Random(accumulate * 1009)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    data, feature = digits_folder, IMAGE
    if kind == "text":
        data, feature = write_news_csv(tmp_path / "news.csv", n=1500), TEXT

    # reference: one uninterrupted run
    ref_cfg = tmp_path / "ref.yaml"
    configs = {}
    for name in ("ref", "killed"):
        if kind == "seq2seq":
            pairs = write_number_pairs(tmp_path / "pairs.tsv", n=1200)
            configs[name] = _seq2seq_config(pairs, tmp_path / name, accumulate)
            continue
        configs[name] = _config(data, tmp_path / name, accumulate, feature)
        if kind == "text":  # the averaged weights resume exactly too
            configs[name]["train"]["ema"] = 0.95
    ref_cfg.write_text(yaml.safe_dump(configs["ref"]))
    code, total = _run(script, ref_cfg, "new", None)
    assert code == 0
    ref = tmp_path / "ref" / "resume" / "v1"

    # the same run, killed twice at random micro-batches and resumed each time
    cfg = tmp_path / "killed.yaml"
    cfg.write_text(yaml.safe_dump(configs["killed"]))
    run = tmp_path / "killed" / "resume" / "v1"
    first = rng.randrange(10, total // 2)
    code, _ = _run(script, cfg, "new", first)
    assert code == -9
    positions = [_checkpoint_position(run)]
    assert not (run / "model.safetensors").exists()
    code, _ = _run(script, cfg, "resume", rng.randrange(5, total // 3))
    assert code == -9
    positions.append(_checkpoint_position(run))
    code, _ = _run(script, cfg, "resume", None)
    assert code == 0

    # the kills happened mid-run, at least one of them in the middle of an epoch
    assert all(step > 0 for _, _, step in positions)
    assert any(batch > 0 for _, batch, _ in positions), positions
    a, b = load_file(ref / "model.safetensors"), load_file(run / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the logged history (losses, metrics, lr) matches too, apart from wall-clock time
    hist_a = json.loads((ref / "metrics.json").read_text())["history"]
    hist_b = json.loads((run / "metrics.json").read_text())["history"]
    assert len(hist_a) == len(hist_b) == 3
    for ha, hb in zip(hist_a, hist_b, strict=True):
        ha.pop("time_s"), hb.pop("time_s")
        assert ha == pytest.approx(hb, rel=1e-9, abs=1e-12)


def test_resume_without_checkpoint_is_a_clear_error(tmp_path: Path, digits_folder: Path) -> None:
    import largo

    with pytest.raises(largo.ConfigError, match="nothing to resume"):
        largo.train(_config(digits_folder, tmp_path / "none", 1), resume=True)
