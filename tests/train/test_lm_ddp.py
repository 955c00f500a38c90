"""Data-parallel pretraining under torchrun (2 CPU processes, Gloo): the same steps as one process,
exact resume with per-rank dropout RNG, and `largo pretrain` (and `largo train` on a classifier and a
seq2seq model) writing one bundle from rank 0."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, load_model

from largo.config_lm import GPTConfig, LMTrainConfig
from largo.data.corpus import TokenData
from largo.models.gpt import GPT
from largo.train.lm import lm_step, pretrain_fit, step_batches
from tests.lm_corpus import tiny_lm_config, write_corpus

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.timeout(300)]

# one config for one process and for two: tokens_per_step = 2 micro-batches, so a single process
# accumulates two and each of two ranks runs one
MODEL = {"dim": 32, "layers": 2, "heads": 2, "context": 32, "vocab_size": 97}
TRAIN = {
    "steps": 6,
    "micro_batch": 4,
    "tokens_per_step": 2 * 4 * 32,
    "eval_every": 3,
    "eval_batches": 2,
    "checkpoint_every": 2,
    "precision": "fp32",
    "progress": False,
    "device": "cpu",
}

# what both workers start with: the data, and the model every run starts from; argv: out folder,
# model, train config (JSON), held-out tokens
PRELUDE = """
import json, sys
import numpy as np, torch
from safetensors.torch import save_file, save_model
from largo.config_lm import GPTConfig, LMTrainConfig
from largo.data.corpus import TokenData
from largo.models.gpt import GPT
from largo.train.checkpoint import full_state_dict
from largo.train.distributed import end_distributed, init_distributed, rank
from largo.train.lm import lm_step, pretrain_fit, step_batches

out, model, train, n_held = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(1)
assert init_distributed("cpu")
rng = np.random.default_rng(0)
tokens, held = rng.integers(0, 97, 20_000).astype(np.uint16), rng.integers(0, 97, n_held).astype(np.uint16)
data = TokenData(tokens, held, {"valid_chars": 4 * n_held, "valid_tokens": n_held, "vocab_size": 97})

def fresh(dropout):
    torch.manual_seed(0)
    return GPT(GPTConfig.model_validate({**model, "dropout": dropout}))

class Killed(Exception):
    pass

def kill(record):
    raise Killed

def whole_and_resumed(cfg):
    # an uninterrupted run, and one killed at its first evaluation (step 3; last checkpoint step 2),
    # then resumed: both with dropout on
    whole = fresh(0.1)
    pretrain_fit(whole, data, cfg, model["context"])
    try:
        pretrain_fit(fresh(0.1), data, cfg, model["context"], checkpoint_dir=f"{out}/ckpt", on_eval=kill)
    except Killed:
        pass
    resumed = fresh(0.1)
    result = pretrain_fit(resumed, data, cfg, model["context"], checkpoint_dir=f"{out}/ckpt", resume=True)
    return whole, resumed, result
"""

WORKER = PRELUDE + textwrap.dedent(
    """
    # 1. the run one process is compared with (no dropout: the ranks' dropout masks differ)
    cfg = LMTrainConfig.model_validate(train)
    m = fresh(0.0)
    result = pretrain_fit(m, data, cfg, model["context"])
    if rank() == 0:
        save_model(m, f"{out}/ddp.safetensors")
        json.dump(result.history, open(f"{out}/history.json", "w"))

    # 2. killed and resumed
    whole, resumed, _ = whole_and_resumed(cfg)
    same = all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))
    json.dump({"resume_equal": same}, open(f"{out}/rank{rank()}.json", "w"))

    # 3. one step's gradients, rank 1's micro-batch holding fewer real targets than rank 0's
    from contextlib import nullcontext
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel
    from largo.train.lm import lm_step, step_batches

    g = fresh(0.0)
    (x, y), = step_batches(data.train, 7, 0, 1, 4, model["context"], rank=rank(), world=2)
    if rank() == 1:
        y[:, 5:] = -100
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    lm_step(DistributedDataParallel(g), [(x, y)], nullcontext(), scaler, 2)
    if rank() == 0:
        save_file({n: p.grad.contiguous() for n, p in g.named_parameters()}, f"{out}/grads.safetensors")
    end_distributed()
    """
)


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _one_process(n_held: int) -> tuple:
    """The workers' data and starting model, trained with TRAIN in this one process: (tokens, data,
    model, result)."""
    rng = np.random.default_rng(0)
    tokens, held = (
        rng.integers(0, 97, 20_000).astype(np.uint16),
        rng.integers(0, 97, n_held).astype(np.uint16),
    )
    data = TokenData(tokens, held, {"valid_chars": 4 * n_held, "valid_tokens": n_held, "vocab_size": 97})
    torch.manual_seed(0)
    single = GPT(GPTConfig.model_validate({**MODEL, "dropout": 0.0}))
    return (
        tokens,
        data,
        single,
        pretrain_fit(single, data, LMTrainConfig.model_validate(TRAIN), MODEL["context"]),
    )


def test_two_processes_take_the_steps_of_one_and_resume_exactly(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER, encoding="utf-8")
    _torchrun([str(script), str(tmp_path), json.dumps(MODEL), json.dumps(TRAIN), "700"], tmp_path)

    # the same config in this one process: two accumulated micro-batches per step instead of one per rank
    tokens, data, single, result = _one_process(700)

    ddp_model = GPT(GPTConfig.model_validate(MODEL))
    load_model(ddp_model, str(tmp_path / "ddp.safetensors"))
    ddp = ddp_model.state_dict()
    torch.manual_seed(0)
    start = GPT(GPTConfig.model_validate(MODEL)).state_dict()
    for name, p in single.state_dict().items():
        assert not torch.equal(p, start[name]), f"{name} did not train"
        assert torch.allclose(p, ddp[name], atol=2e-6, rtol=1e-5), (name, (p - ddp[name]).abs().max())
    history = json.loads((tmp_path / "history.json").read_text())
    assert [r["step"] for r in history] == [r["step"] for r in result.history] == [3, 6]
    for a, b in zip(history, result.history, strict=True):
        assert a["tokens"] == b["tokens"] == a["step"] * 2 * 4 * 32  # tokens over both ranks
        assert a["train.loss"] == pytest.approx(b["train.loss"], rel=1e-5)
        assert a["valid.loss"] == pytest.approx(b["valid.loss"], rel=1e-5)  # shared-out evaluation
    for r in (0, 1):  # every rank's resumed weights equal its uninterrupted run's, dropout included
        assert json.loads((tmp_path / f"rank{r}.json").read_text()) == {"resume_equal": True}
    # the all-reduced gradient of the two ranks' micro-batches = one process's over both, per token
    torch.manual_seed(0)
    g = GPT(GPTConfig.model_validate(MODEL))
    micro = step_batches(tokens, 7, 0, 2, 4, MODEL["context"])
    micro[1][1][:, 5:] = -100
    lm_step(g, micro, contextlib.nullcontext(), torch.amp.GradScaler("cpu", enabled=False))
    ddp_grads = load_file(tmp_path / "grads.safetensors")
    for name, p in g.named_parameters():
        assert torch.allclose(p.grad, ddp_grads[name], rtol=1e-5, atol=1e-8), name

    ckpt = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)
    assert len(ckpt["rng_by_rank"]) == 2
    assert not torch.equal(ckpt["rng_by_rank"][0]["torch"], ckpt["rng_by_rank"][1]["torch"])


FSDP_WORKER = PRELUDE + textwrap.dedent(
    """
    cfg = LMTrainConfig.model_validate({**train, "parallel": "fsdp"})
    sharded = fresh(0.0)
    result = pretrain_fit(sharded, data, cfg, model["context"], checkpoint_dir=f"{out}/first")
    local = {n: p.to_local().numel() for n, p in sharded.named_parameters()}  # this rank's shard sizes
    kind = type(sharded.embed.weight).__name__
    groups = [hasattr(b, "reshard") for b in sharded.blocks]  # each block is its own FSDP group
    json.dump({"local": local, "dtensor": kind, "groups": groups}, open(f"{out}/shard{rank()}.json", "w"))
    # two micro-batches a rank: each one's gradients reduce-scattered and summed on the shards
    four = LMTrainConfig.model_validate({**cfg.model_dump(), "tokens_per_step": 4 * 4 * model["context"]})
    accumulated = pretrain_fit(fresh(0.0), data, four, model["context"])
    if rank() == 0:
        save_file({k: v.contiguous() for k, v in accumulated.state.items()}, f"{out}/accumulated.safetensors")
    if rank() == 0:
        save_file({k: v.contiguous() for k, v in result.state.items()}, f"{out}/fsdp.safetensors")
        json.dump(result.history, open(f"{out}/history.json", "w"))

    # killed and resumed
    whole, _, resumed = whole_and_resumed(cfg)
    a = full_state_dict(whole)[0]
    if rank() == 0:
        same = sorted(a) == sorted(resumed.state) and all(torch.equal(a[k], resumed.state[k]) for k in a)
        json.dump({"resume_equal": same}, open(f"{out}/resume.json", "w"))
    end_distributed()
    """
)


def test_sharded_fsdp_training_takes_the_steps_of_one_process_and_resumes_exactly(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(FSDP_WORKER, encoding="utf-8")
    _torchrun([str(script), str(tmp_path), json.dumps(MODEL), json.dumps(TRAIN), "701"], tmp_path)

    # each rank held half of every weight (FSDP2 shards dim 0): that is what saves the memory
    shards = [json.loads((tmp_path / f"shard{r}.json").read_text()) for r in (0, 1)]
    torch.manual_seed(0)
    start = GPT(GPTConfig.model_validate(MODEL))
    full = {n: p.numel() for n, p in start.named_parameters()}
    assert shards[0]["dtensor"] == "DTensor" and shards[0]["groups"] == [True, True]
    assert all(shards[0]["local"][n] + shards[1]["local"][n] == full[n] for n in full)
    assert shards[0]["local"]["embed.weight"] < full["embed.weight"]
    # the same config in one process (two accumulated micro-batches a step), as for DDP
    _, data, single, result = _one_process(701)
    sharded = load_file(tmp_path / "fsdp.safetensors")
    for name, p in single.state_dict().items():
        assert not torch.equal(p, start.state_dict()[name]), f"{name} did not train"
        assert torch.allclose(p, sharded[name], atol=2e-6, rtol=1e-5), (name, (p - sharded[name]).abs().max())
    history = json.loads((tmp_path / "history.json").read_text())
    for a, b in zip(history, result.history, strict=True):
        assert a["train.loss"] == pytest.approx(b["train.loss"], rel=1e-5)
        # 21 held-out windows: one rank evaluates a blank one, which counts no token
        assert a["valid.loss"] == pytest.approx(b["valid.loss"], rel=1e-5)
    assert json.loads((tmp_path / "resume.json").read_text()) == {"resume_equal": True}
    # 2 ranks × 2 accumulated micro-batches = one process accumulating 4
    torch.manual_seed(0)
    four = GPT(GPTConfig.model_validate({**MODEL, "dropout": 0.0}))
    pretrain_fit(four, data, LMTrainConfig.model_validate({**TRAIN, "tokens_per_step": 4 * 4 * 32}), 32)
    accumulated = load_file(tmp_path / "accumulated.safetensors")
    for name, p in four.state_dict().items():
        assert torch.allclose(p, accumulated[name], atol=2e-6, rtol=1e-5), name
    # the sharded run's checkpoint holds whole weights, which one process loads
    ckpt = torch.load(tmp_path / "first" / "last.pt", weights_only=True)
    one = GPT(GPTConfig.model_validate(MODEL))
    one.load_state_dict(ckpt["model"])
    assert ckpt["step"] == 4 and tuple(ckpt["model"]["embed.weight"].shape) == (97, 32)
    # resuming it without sharding says which setting wrote it (its optimizer state is keyed by name)
    with pytest.raises(ValueError, match=r"written by a sharded \(train.parallel: fsdp under torchrun\) run"):
        pretrain_fit(
            one, data, LMTrainConfig.model_validate(TRAIN), 32, checkpoint_dir=tmp_path / "first", resume=True
        )
    from largo.config import ConfigError
    from largo.config_lm import validate_lm_config

    lora = {"lora": {"rank": 4}, "init_from": str(tmp_path), "parallel": "fsdp"}
    with pytest.raises(ConfigError, match="train.parallel: fsdp shards whole models; LoRA .* use ddp"):
        validate_lm_config({"data": {"paths": ["x.txt"]}, "train": lora})


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_largo_pretrain_under_torchrun_writes_one_bundle(tmp_path, parallel):
    corpus = write_corpus(tmp_path / "corpus", lines=1500)
    cfg = tiny_lm_config(corpus, tmp_path / "runs", steps=8, eval_every=4, checkpoint_every=4)
    cfg["train"] |= {"tokens_per_step": 2 * 8 * 64, "device": "cpu", "parallel": parallel}
    config = tmp_path / "lm.yaml"
    config.write_text(json.dumps(cfg), encoding="utf-8")  # JSON is YAML
    done = _torchrun(["-m", "largo.cli", "pretrain", str(corpus), "--config", str(config)], tmp_path)
    runs = sorted(p.name for p in (tmp_path / "runs" / "lm").iterdir())
    assert runs == ["v1"], runs  # rank 0 chose the folder for both
    metrics = json.loads((tmp_path / "runs" / "lm" / "v1" / "metrics.json").read_text())
    assert metrics["tokens"] == 8 * 2 * 8 * 64 and metrics["steps"] == 8
    assert "2 processes × 1 × 8 × 64" in done.stderr
    assert (tmp_path / "runs" / "lm" / "v1" / "model.safetensors").exists()
    import largo

    assert largo.load(tmp_path / "runs" / "lm" / "v1").generate("the cat", 5, temperature=0)


# ---------------------------------------------------------------------------------------- a classifier


def test_largo_train_under_torchrun_takes_the_steps_of_one_process(tmp_path):
    from sklearn.datasets import load_iris

    import largo

    d = load_iris()
    rows = [",".join([*(f"{v:.1f}" for v in x), f"s{t}"]) for x, t in zip(d.data, d.target, strict=True)]
    (tmp_path / "iris.csv").write_text("a,b,c,e,species\n" + "\n".join(rows) + "\n", encoding="utf-8")

    def config(runs: str, accumulate: int) -> dict:
        return {
            "name": "iris",
            "runs_dir": str(tmp_path / runs),
            "data": {"train": str(tmp_path / "iris.csv")},
            "inputs": [{"name": n, "type": "number"} for n in "abce"],
            "outputs": [{"name": "species", "type": "category"}],
            "model": {"hidden": [16], "dropout": 0.0},
            "train": {
                "epochs": 3,
                "batch_size": 8,
                "accumulate": accumulate,
                "device": "cpu",
                "progress": False,
                # SGD: unlike Adam it is not blind to a wrong gradient scale (DDP averages over ranks)
                "optimizer": {"name": "sgd", "lr": 0.2},
            },
        }

    (tmp_path / "ddp.yaml").write_text(json.dumps(config("ddp", 1)), encoding="utf-8")
    done = _torchrun(["-m", "largo.cli", "train", str(tmp_path / "ddp.yaml")], tmp_path)
    assert done.stdout.count("bundle:") == 1  # rank 0 reports
    assert sorted(p.name for p in (tmp_path / "ddp" / "iris").iterdir()) == ["v1"]
    ddp = json.loads((tmp_path / "ddp" / "iris" / "v1" / "metrics.json").read_text())

    single = largo.train(config("one", 2))  # two accumulated batches per step instead of one per rank
    batches = math.ceil(single.metrics["splits"]["train"] / 8)
    assert batches % 2 == 1  # a short last step: rank 1 has no batch there and joins at weight 0
    assert ddp["steps"] == single.metrics["steps"] == 3 * math.ceil(batches / 2)
    for a, b in zip(ddp["history"], single.metrics["history"], strict=True):
        assert a["train.loss"] == pytest.approx(b["train.loss"], rel=1e-5)
        assert a["valid.loss"] == pytest.approx(b["valid.loss"], rel=1e-5)
    one = load_file(single.path / "model.safetensors")
    for name, w in load_file(tmp_path / "ddp" / "iris" / "v1" / "model.safetensors").items():
        assert torch.allclose(w, one[name], atol=1e-6, rtol=1e-5), name


@pytest.mark.slow
def test_a_seq2seq_run_under_torchrun_takes_the_steps_of_one_process(tmp_path):
    import largo
    from largo.data.samples import write_number_pairs

    pairs = write_number_pairs(tmp_path / "pairs.tsv", n=300)

    def config(runs: str, accumulate: int) -> dict:
        return {
            "task": "seq2seq",
            "name": "numbers",
            "runs_dir": str(tmp_path / runs),
            "data": {"train": str(pairs), "source": "english", "target": "chinese", "test": 0.1},
            "tokenizer": {"vocab_size": 300, "max_source_length": 24, "max_target_length": 16},
            "model": {"dim": 32, "encoder_layers": 1, "decoder_layers": 1, "heads": 2, "dropout": 0.0},
            "train": {
                "epochs": 2, "batch_size": 16, "accumulate": accumulate, "device": "cpu", "progress": False,
                "optimizer": {"name": "sgd", "lr": 0.5}, "schedule": {"name": "constant"},
                "label_smoothing": 0.0, "eval_generate": 8,
            },
            "decode": {"beams": 2},
        }  # fmt: skip

    (tmp_path / "ddp.yaml").write_text(json.dumps(config("ddp", 1)), encoding="utf-8")
    done = _torchrun(["-m", "largo.cli", "train", str(tmp_path / "ddp.yaml")], tmp_path)
    assert done.stdout.count("bundle:") == 1 and "test chinese:" in done.stdout  # rank 0 reports
    assert sorted(p.name for p in (tmp_path / "ddp" / "numbers").iterdir()) == ["v1"]
    bundle = tmp_path / "ddp" / "numbers" / "v1"
    ddp = json.loads((bundle / "metrics.json").read_text())

    single = largo.train(config("one", 2))  # two accumulated batches per step instead of one per rank
    assert ddp["steps"] == single.metrics["steps"]
    for a, b in zip(ddp["history"], single.metrics["history"], strict=True):
        assert a["train.loss"] == pytest.approx(b["train.loss"], rel=1e-5)
        assert a["valid.loss"] == pytest.approx(b["valid.loss"], rel=1e-5)
        assert a["valid.chrf"] == pytest.approx(b["valid.chrf"], abs=1e-6)  # rank 0 decoded the probe
    one = load_file(single.path / "model.safetensors")
    for name, w in load_file(bundle / "model.safetensors").items():
        assert torch.allclose(w, one[name], atol=1e-6, rtol=1e-5), name
    # the tokenizer rank 0 trained is the one both ranks encoded with
    assert (bundle / "tokenizer.json").read_text() == (single.path / "tokenizer.json").read_text()


FIT_WORKER = textwrap.dedent(
    """
    import json, sys
    import torch
    from torch import nn
    from largo.config import TrainConfig
    from largo.data.loader import EncodedSplit
    from largo.train.distributed import end_distributed, init_distributed, rank
    from largo.train.loop import fit

    out = sys.argv[1]
    torch.set_num_threads(1)
    assert init_distributed("cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(150, 6, generator=g)
    split = EncodedSplit({"x": x}, {"y": (x[:, 0] + x[:, 1] > 0).long()})

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 2))

        def forward(self, batch):
            return {"y": self.body(batch["x"])}

    def fresh():
        torch.manual_seed(0)
        return Net()

    def loss_fn(outputs, targets):
        return nn.functional.cross_entropy(outputs["y"], targets["y"], reduction="sum")

    cfg = TrainConfig(epochs=4, batch_size=8, device="cpu", progress=False, seed=3, ema=None)
    whole = fresh()
    fit(whole, split, split, cfg, loss_fn)

    class Killed(Exception):
        pass

    def kill(record):
        if record["epoch"] == 2:  # after epoch 2's checkpoint
            raise Killed

    try:
        fit(fresh(), split, split, cfg, loss_fn, checkpoint_dir=f"{out}/fit", on_epoch_end=kill)
    except Killed:
        pass
    resumed = fresh()
    result = fit(resumed, split, split, cfg, loss_fn, checkpoint_dir=f"{out}/fit", resume=True)
    same = all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))
    record = {"equal": same, "epochs": [r["epoch"] for r in result.history]}
    json.dump(record, open(f"{out}/fit{rank()}.json", "w"))
    end_distributed()
    """
)


def test_a_resumed_data_parallel_fit_equals_an_uninterrupted_one(tmp_path):
    script = tmp_path / "fit_worker.py"
    script.write_text(FIT_WORKER, encoding="utf-8")
    _torchrun([str(script), str(tmp_path)], tmp_path)
    for r in (0, 1):  # dropout on, so each rank's RNG had to come back from the checkpoint
        assert json.loads((tmp_path / f"fit{r}.json").read_text()) == {"equal": True, "epochs": [1, 2, 3, 4]}
    ckpt = torch.load(tmp_path / "fit" / "last.pt", weights_only=True)
    assert not torch.equal(ckpt["rng_by_rank"][0]["torch"], ckpt["rng_by_rank"][1]["torch"])
