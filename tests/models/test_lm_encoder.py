"""Language models as text encoders: a largo LM bundle (`encoder: {from: …}`) and a Hugging Face GPT-2.

The LM bundle here is written directly in the bundle format (config.yaml, tokenizer.json, random GPT
weights in model.safetensors), so no pretraining runs; tests/e2e/test_pretrain_finetune.py trains a
real one. Checked: the config syntax and its round trip, pooling against `GPT.hidden` of the bundle
as deploy/ reads it, padding, truncation to the context, the rebuild without the LM folder, freezing,
the processor's pad id and saved sizes, readable errors for a wrong `from`, and a tiny random GPT-2
folder as `pretrained: PATH` (no downloads).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_model, save_file, save_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import largo
from largo.config import (
    Config,
    ConfigError,
    LmEncoderConfig,
    PretrainedEncoderConfig,
    dump_config,
    load_config,
    validate_config,
)
from largo.config_lm import dump_lm_config, validate_lm_config
from largo.data.features import Processor, make_processor
from largo.data.readers import DataError
from largo.data.text import TextProcessor
from largo.deploy.generator import read_lm_bundle
from largo.models.build import build_model
from largo.models.gpt import GPT
from largo.models.layers import masked_mean
from largo.models.zoo import PRETRAINED_TEXT_ENCODERS

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "cats and dogs", "", "the park"]
SIZES = {"dim": 32, "layers": 2, "heads": 2, "context": 16}


def byte_bpe(texts: list[str], specials: list[str], vocab_size: int = 300) -> Tokenizer:
    """A byte-level BPE as `largo pretrain` trains one (GPT-2's scheme)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts * 5, trainer)
    return tok


@pytest.fixture(scope="module")
def lm_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runs/lm/v1 of a tiny LM with random weights, in the format deploy/generator.py writes."""
    folder = tmp_path_factory.mktemp("runs") / "lm" / "v1"
    folder.mkdir(parents=True)
    tok = byte_bpe(TEXTS, ["<|endoftext|>", "<pad>"])
    cfg = validate_lm_config(
        {"data": {"paths": ["corpus.txt"]}, "model": {**SIZES, "vocab_size": tok.get_vocab_size()}}
    )
    (folder / "config.yaml").write_text(dump_lm_config(cfg), encoding="utf-8")
    tok.save(str(folder / "tokenizer.json"))
    torch.manual_seed(0)
    save_model(GPT(cfg.model), str(folder / "model.safetensors"))
    return folder


def text_config(encoder: dict, **feature) -> dict:
    return {
        "data": {"train": "unused.csv"},
        "inputs": [{"name": "text", "type": "text", "encoder": encoder, **feature}],
        "outputs": [{"name": "label", "type": "category"}],
    }


def labels(cfg: Config) -> Processor:
    """The fitted processor of the category output."""
    label = make_processor(cfg.outputs[0], True)
    label.fit(["neg", "pos"])
    return label


def fitted(lm_bundle: Path, **encoder) -> tuple[TextProcessor, dict]:
    """The text processor fitted with the LM's tokenizer, and the config it came from."""
    cfg = validate_config(text_config({"from": str(lm_bundle), **encoder}))
    proc = make_processor(cfg.inputs[0], False)
    proc.fit(TEXTS)
    assert isinstance(proc, TextProcessor)
    return proc, cfg


def lm_encoder(lm_bundle: Path, proc: TextProcessor, saved: dict | None = None, **encoder) -> torch.nn.Module:
    config = LmEncoderConfig.model_validate({"from": str(lm_bundle), **encoder})
    return PRETRAINED_TEXT_ENCODERS["lm"](config, proc.pad_id, 0.0, saved).eval()


# ------------------------------------------------------------------------------------------- config


def test_from_means_an_lm_encoder_with_its_tokenizer_and_round_trips():
    for encoder in (
        {"from": "runs/lm/v1"},
        {"kind": "lm", "from": "runs/lm/v1"},
        {"kind": "lm", "path": "runs/lm/v1"},
    ):
        cfg = validate_config(text_config(encoder))
        f = cfg.inputs[0]
        assert f.encoder.kind == "lm" and f.encoder.path == "runs/lm/v1"
        assert (f.encoder.pooling, f.encoder.freeze, f.encoder.lr_scale) == ("mean", False, 0.1)
        assert f.tokenizer.kind == "pretrained" and f.tokenizer.path == "runs/lm/v1"
        assert validate_config(yaml.safe_load(dump_config(cfg))) == cfg  # the bundle's config.yaml


def test_lm_encoder_errors_name_the_key():
    with pytest.raises(ConfigError) as e:
        validate_config(text_config({"from": "x", "pooling": "cls"}))
    assert "inputs.0.encoder.pooling" in str(e.value) and ".lm." not in str(e.value)
    with pytest.raises(ConfigError, match=r"inputs\.0\.encoder\.from: required key is missing"):
        validate_config(text_config({"kind": "lm"}))
    with pytest.raises(ConfigError, match=r"inputs\.0\.encoder: unknown kind .*'pretrained', 'lm'"):
        validate_config(text_config({"kind": "gpt"}))


def test_a_relative_from_in_yaml_resolves_against_the_file(tmp_path, lm_bundle):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "runs").symlink_to(lm_bundle.parent.parent)
    file = tmp_path / "cfg" / "run.yaml"
    file.write_text(yaml.safe_dump(text_config({"from": "runs/lm/v1"})), encoding="utf-8")
    f = load_config(file).inputs[0]
    assert f.encoder.path == f.tokenizer.path == str(tmp_path / "cfg" / "runs/lm/v1")


# ------------------------------------------------------------------------------------------ encoder


def test_pooling_matches_the_gpt_of_the_bundle(lm_bundle):
    proc, _ = fitted(lm_bundle)
    gpt = read_lm_bundle(lm_bundle).model  # the LM as generation reads it
    ids = proc.encode(TEXTS)
    mask = ids != proc.pad_id
    with torch.no_grad():
        h = gpt.hidden(ids.long())
        mean = lm_encoder(lm_bundle, proc)(ids)
        last = lm_encoder(lm_bundle, proc, pooling="last")(ids)
    assert mean.shape == (len(TEXTS), SIZES["dim"])
    assert torch.allclose(mean, masked_mean(h, mask), atol=1e-6)
    lengths = mask.sum(1)
    for i, n in enumerate(lengths.tolist()):
        expected = h[i, n - 1] if n else torch.zeros(SIZES["dim"])  # an empty text pools to zeros
        assert torch.allclose(last[i], expected, atol=1e-6)


def test_padding_and_long_inputs_change_nothing(lm_bundle):
    proc, _ = fitted(lm_bundle)
    ids = proc.encode(TEXTS)
    long = torch.cat([ids, torch.full((len(ids), 40), proc.pad_id, dtype=ids.dtype)], dim=1)  # > context
    for pooling in ("mean", "last"):
        enc = lm_encoder(lm_bundle, proc, pooling=pooling)
        with torch.no_grad():
            assert torch.allclose(enc(long), enc(ids), atol=1e-6)
            assert torch.isfinite(enc(torch.full((2, 3), proc.pad_id))).all()
    # the processor cuts texts at the LM's context, not at tokenizer.max_length (256)
    assert proc.max_length == SIZES["context"]
    assert proc.encode(["word " * 100]).shape == (1, SIZES["context"])


def test_body_without_lm_head_and_the_flags_build_model_reads(lm_bundle):
    proc, _ = fitted(lm_bundle)
    enc = lm_encoder(lm_bundle, proc)
    gpt = read_lm_bundle(lm_bundle).model
    assert not any(k.startswith("body.head") for k in enc.state_dict())
    assert sum(p.numel() for p in enc.parameters()) == gpt.num_parameters()
    assert enc.own_init and enc.lr_scale == 0.1 and enc.out_dim == SIZES["dim"]
    assert torch.equal(enc.body.embed.weight, gpt.embed.weight)  # the LM's weights, not random ones
    frozen = lm_encoder(lm_bundle, proc, freeze=True)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_processor_pads_with_pad_and_saves_the_gpt_sizes(lm_bundle):
    proc, cfg = fitted(lm_bundle)
    tok = Tokenizer.from_file(str(lm_bundle / "tokenizer.json"))
    assert proc.pad_id == tok.token_to_id("<pad>") == 1
    state = json.loads(json.dumps(proc.state()))
    assert {k: state["model_config"][k] for k in SIZES} == SIZES
    assert state["model_config"]["vocab_size"] == tok.get_vocab_size()
    restored = TextProcessor(cfg.inputs[0], state)
    assert torch.equal(restored.encode(TEXTS), proc.encode(TEXTS))
    assert restored.max_length == SIZES["context"]


def test_model_rebuilds_without_the_lm_folder(lm_bundle, tmp_path):
    proc, cfg = fitted(lm_bundle)
    label = labels(cfg)
    processors = {"text": proc, "label": label}
    torch.manual_seed(0)
    model = build_model(cfg, processors).eval()
    save_model(model, str(tmp_path / "model.safetensors"))
    # the bundle's config names a folder that is gone; the processor state holds the sizes
    gone = validate_config(text_config({"from": str(tmp_path / "moved-away")}))
    restored = TextProcessor(gone.inputs[0], json.loads(json.dumps(proc.state())))
    rebuilt = build_model(gone, {"text": restored, "label": label}, load_pretrained=False).eval()
    missing, unexpected = load_model(rebuilt, str(tmp_path / "model.safetensors"))
    assert not missing and not unexpected
    ids = {"text": proc.encode(TEXTS)}
    with torch.no_grad():
        assert torch.equal(rebuilt(ids)["label"], model(ids)["label"])


# ------------------------------------------------------------------------------------------- errors


def test_a_wrong_from_names_the_key_and_says_what_it_found(lm_bundle, tmp_path):
    def error(path: Path) -> str:
        cfg = validate_config(text_config({"from": str(path)}))
        with pytest.raises(DataError) as e:
            make_processor(cfg.inputs[0], False).fit(TEXTS)
        return str(e.value)

    message = error(tmp_path / "nowhere")
    assert "text feature 'text': encoder.from" in message and "nowhere" in message
    assert "versions v1" in error(lm_bundle.parent)  # runs/lm instead of runs/lm/v1
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}", encoding="utf-8")
    assert "pretrained: PATH" in error(hf)
    classifier = tmp_path / "classifier"
    classifier.mkdir()
    (classifier / "config.yaml").write_text(yaml.safe_dump(text_config("cnn")), encoding="utf-8")
    assert "classifier's" in error(classifier)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((lm_bundle / "config.yaml").read_text(), encoding="utf-8")
    assert "lacks tokenizer.json, model.safetensors" in error(unfinished)
    with pytest.raises(DataError, match="encoder.from"):  # the encoder on its own, too
        PRETRAINED_TEXT_ENCODERS["lm"](LmEncoderConfig.model_validate({"from": str(hf)}), 1)
    with pytest.raises(FileNotFoundError, match=r"language-model bundle: use encoder: \{from: PATH\}"):
        PRETRAINED_TEXT_ENCODERS["pretrained"](PretrainedEncoderConfig(path=str(lm_bundle)), 1)
    adapter = shutil.copytree(lm_bundle, tmp_path / "adapter")  # weights that are not the whole GPT
    for weights in ({"embed.weight": torch.zeros(3, 3)}, {"blocks.0.norm1.weight": torch.ones(SIZES["dim"])}):
        save_file(weights, str(adapter / "model.safetensors"))
        with pytest.raises(ValueError, match="encoder.from: the weights .* do not match .*(size|missing)"):
            PRETRAINED_TEXT_ENCODERS["lm"](LmEncoderConfig.model_validate({"from": str(adapter)}), 1)


# ---------------------------------------------------------------------------- a Hugging Face GPT-2


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random GPT-2 causal LM folder (config.json, safetensors, tokenizer.json with <pad>)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("gpt2")
    tok = byte_bpe(TEXTS, ["<|endoftext|>", "<pad>"])
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, n_positions=32, vocab_size=tok.get_vocab_size(), bos_token_id=0
    )
    config.eos_token_id = 0
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def test_gpt2_folder_pools_its_real_tokens(gpt2_folder):
    from transformers import GPT2Model

    cfg = validate_config(text_config({"pooling": "last"}, pretrained=str(gpt2_folder)))
    proc = make_processor(cfg.inputs[0], False)
    proc.fit(TEXTS)
    assert proc.pad_id == 1  # <pad>, not the end-of-text token
    enc = build_model(cfg, {"text": proc, "label": labels(cfg)}).encoders["text"].eval()
    reference = GPT2Model.from_pretrained(gpt2_folder, local_files_only=True).eval()
    ids = proc.encode(TEXTS)
    padded = torch.cat([ids, torch.full((len(ids), 5), proc.pad_id, dtype=ids.dtype)], dim=1)
    with torch.no_grad():
        h = reference(input_ids=ids.long(), attention_mask=(ids != 1).long()).last_hidden_state
        out = enc(padded)
    for i, n in enumerate((ids != 1).sum(1).tolist()):
        assert torch.allclose(out[i], h[i, max(n - 1, 0)], atol=1e-5)


def test_gpt2_without_a_pad_token_pads_with_end_of_text(gpt2_folder, tmp_path):
    folder = tmp_path / "gpt2-no-pad"
    folder.mkdir()
    (folder / "config.json").write_text((gpt2_folder / "config.json").read_text(), encoding="utf-8")
    byte_bpe(TEXTS, ["<|endoftext|>"]).save(str(folder / "tokenizer.json"))
    cfg = validate_config(text_config({}, pretrained=str(folder)))
    proc = make_processor(cfg.inputs[0], False)
    proc.fit(TEXTS)
    assert proc.pad_id == 0  # eos_token_id of config.json, as GPT-2 users set pad_token = eos_token


def test_gpt2_folder_trains_and_its_bundle_needs_no_folder(gpt2_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = shutil.copytree(gpt2_folder, tmp_path / "gpt2")
    data = tmp_path / "reviews.csv"
    with data.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(
            [(f"the cat {i}", "pos") for i in range(12)] + [(f"a dog {i}", "neg") for i in range(12)]
        )
    result = largo.train(
        {
            "name": "gpt2",
            "runs_dir": str(tmp_path / "runs"),
            "data": {"train": str(data), "valid": 0.25, "test": None},
            "inputs": [{"name": "text", "type": "text", "pretrained": str(folder)}],
            "outputs": [{"name": "label", "type": "category"}],
            "train": {"epochs": 2, "batch_size": 8, "progress": False},
        }
    )
    texts = ["the cat sat", "a dog ran"]
    before = largo.load(result.path).predict(texts)
    shutil.rmtree(folder)  # the bundle keeps config.json's architecture, the tokenizer and the weights
    assert largo.load(result.path).predict(texts) == before
