"""A local Hugging Face causal LM (Llama, Qwen2, Mistral) converts into a largo GPT that computes what
transformers computes, writes as an LM bundle, generates, exports to ONNX and fine-tunes with LoRA.

The folders are tiny random models made here with transformers (no download), with grouped-query
attention, biases, an untied head and Llama 3's RoPE scaling, and norms moved off 1 so a mis-mapped
tensor shows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import transformers
from tokenizers import pre_tokenizers, processors, trainers
from typer.testing import CliRunner

import largo
from largo.cli import app
from largo.data.corpus import new_byte_bpe
from largo.deploy.generator import TextGenerator
from largo.deploy.hf_lm import import_hf_lm
from largo.deploy.metadata import BundleError
from tests.lm_corpus import write_corpus

pytestmark = pytest.mark.usefixtures("one_thread")

COMMON = {
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "bos_token_id": 0,
    "eos_token_id": 1,
}
FAMILIES = {
    "llama": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        {
            "tie_word_embeddings": False,
            "attention_bias": True,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,  # shorter than the test's text: the scaling acts
            },
        },
    ),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {"tie_word_embeddings": True}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"sliding_window": None}),
}
CHAT = {  # ChatML (Qwen2.5-Instruct), and a Llama-3-like template that opens with the BOS token
    "qwen2": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    "llama": "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' and loop.first %}"
    "{{ raise_exception('a conversation starts with the user') }}{% endif %}"
    "[{{ m['role'] | upper }}] {{ m['content'] | tojson }}\n{% endfor %}"
    "{% if add_generation_prompt %}[ASSISTANT]{% endif %}",
}
TEXT = "the cat sat on the mat 今天天气很好 and the dog ran to the park " * 3


def make_folder(folder: Path, family: str, corpus: Path) -> Path:
    """A random `family` model saved as transformers saves one, with a byte-level BPE trained on the
    test corpus as its tokenizer.json (ids 0, 1: <s>, </s>; Llama's adds <s> before a text)."""
    config_cls, model_cls, extra = FAMILIES[family]
    tok = new_byte_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=COMMON["vocab_size"],
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus.read_text(encoding="utf-8").splitlines(), trainer)
    if family == "llama":  # Llama's tokenizer puts <s> first when asked for special tokens
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    torch.manual_seed(0)
    model = model_cls(config_cls(**COMMON, **extra))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # norm scales and biases off their init
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    if family in CHAT:  # an instruct model's chat template, where transformers' tokenizer finds it
        special = {"bos_token": "<s>", "eos_token": "</s>"}
        (folder / "tokenizer_config.json").write_text(json.dumps({**special, "chat_template": CHAT[family]}))
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), lines=600)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {family: make_folder(root / family, family, corpus) for family in FAMILIES}


def hf_model(folder: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_converted_model_computes_the_logits_transformers_computes(folders, family):
    bundle = import_hf_lm(folders[family])
    cfg = bundle.config.model
    assert cfg.kv_heads == 2 and cfg.tie_embeddings == (family == "qwen2")
    assert bundle.config.tokenizer.bos == ("<s>" if family == "llama" else None)
    assert cfg.qkv_bias == (family != "mistral") and cfg.proj_bias == (family == "llama")
    assert (cfg.rope_scaling is not None) == (family == "llama")
    ids = torch.tensor([bundle.tokenizer.encode(TEXT, add_special_tokens=False).ids])
    assert ids.shape[1] > 40
    with torch.no_grad():
        want = hf_model(folders[family])(ids).logits
        got = bundle.model(ids)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)  # same vocabulary: no token added
    assert bundle.config.tokenizer.pad == "</s>"  # no pad token in config.json: the end of text pads


def test_an_untied_checkpoint_without_the_tie_setting_keeps_its_output_layer(folders, tmp_path):
    folder = tmp_path / "mistral"
    shutil.copytree(folders["mistral"], folder)
    config = json.loads((folder / "config.json").read_text())
    del config["tie_word_embeddings"]  # transformers reads it as untied, and lm_head.weight is there
    (folder / "config.json").write_text(json.dumps(config))
    bundle = import_hf_lm(folder)
    assert bundle.config.model.tie_embeddings is False
    ids = torch.tensor([bundle.tokenizer.encode(TEXT, add_special_tokens=False).ids])
    with torch.no_grad():
        torch.testing.assert_close(bundle.model(ids), hf_model(folder)(ids).logits, atol=1e-4, rtol=0)


def test_llama3_rope_scaling_is_applied(folders):
    """The parity above needs the scaled frequencies: without them the logits differ."""
    from largo.models.gpt import GPT

    bundle = import_hf_lm(folders["llama"])
    plain = GPT(bundle.config.model.model_copy(update={"rope_scaling": None}))
    plain.load_state_dict(bundle.model.state_dict())
    ids = torch.tensor([bundle.tokenizer.encode(TEXT, add_special_tokens=False).ids])
    with torch.no_grad():
        assert (plain.eval()(ids) - bundle.model(ids)).abs().max() > 1e-4


def test_cached_greedy_generation_matches_transformers_generate(folders):
    folder = folders["llama"]
    gen = TextGenerator(import_hf_lm(folder))
    assert gen.eot == 1  # the model's own end-of-text token (</s>), from generation_config.json
    assert gen.config.tokenizer.bos == "<s>" and gen.bos == 0  # its tokenizer's post-processor adds it
    prompt = gen.encode("the cat sat")
    assert prompt[0] == 0 and prompt[1:] == gen.tokenizer.encode("the cat sat", add_special_tokens=False).ids
    long = gen.prompt_ids("the cat sat " * 200)  # cut to the context, <s> kept first
    assert (
        len(long) == gen.context - 1
        and long[0] == 0
        and long[1:] == gen.encode("the cat sat " * 200)[-len(long) + 1 :]
    )
    ours = list(gen.stream_ids("the cat sat", 24, temperature=0, stop_at_eot=False))
    with torch.no_grad():
        ids = torch.tensor([prompt])
        theirs = hf_model(folder).generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False, eos_token_id=None
        )
    assert ours == theirs[0, len(prompt) :].tolist()


def test_largo_import_writes_a_bundle_that_generates_and_exports(folders, tmp_path, corpus):
    out = tmp_path / "runs" / "qwen" / "v1"
    result = CliRunner().invoke(app, ["import", str(folders["qwen2"]), "--out", str(out), "--context", "128"])
    assert result.exit_code == 0, result.output
    assert "imported qwen2" in result.output and "context 128 of 256" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["imported"]["eot"] == "</s>" and metrics["name"] == "qwen"  # runs/<name>/v1
    loaded = largo.load(out)  # from the bundle alone: safetensors and tokenizer.json
    direct = TextGenerator(import_hf_lm(folders["qwen2"], context=128))
    sampling = {"temperature": 0.9, "top_k": 20, "seed": 3}
    assert loaded.generate("the dog", 30, **sampling) == direct.generate("the dog", 30, **sampling)
    assert loaded.context == 128
    for target in (out, folders["qwen2"]):  # a bundle, or the checkpoint itself: nothing overwritten
        again = CliRunner().invoke(app, ["import", str(folders["qwen2"]), "--out", str(target)])
        assert again.exit_code == 2 and "is not empty" in again.output
    assert hf_model(folders["qwen2"]).config.model_type == "qwen2"
    hint = CliRunner().invoke(app, ["generate", str(folders["qwen2"]), "hi"])
    assert hint.exit_code == 2 and f"largo import {folders['qwen2']} --out DIR" in hint.output
    with pytest.raises(largo.DataError, match="names no corpus .* pass --data"):
        largo.export(out, format="onnx")  # an imported bundle has no validation split to check on

    # the grouped-query graph exports, and its parity check passes on held-out text
    record = largo.export(out, format="onnx", data=corpus)["formats"]["onnx"]
    assert record["parity"]["passed"], record
    for way in ("whole", "cached", "rows"):
        assert record["parity"][way]["max_abs_diff"] < 1e-4
    onnx = largo.load(out, runtime="onnx")
    assert onnx.generate("the dog", 30, temperature=0) == loaded.generate("the dog", 30, temperature=0)
    for info in (loaded.info(), onnx.info()):  # what `largo info` and /health read
        assert info["imported"]["model_type"] == "qwen2" and info["chat"] is True
        assert info["tokens"] == {"eot": "</s>", "bos": None, "pad": "</s>", "stop": []}


def test_what_does_not_convert_is_named(folders, tmp_path):
    bad = tmp_path / "gpt2"
    shutil.copytree(folders["mistral"], bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(BundleError, match="model_type 'gpt2' does not convert; supported: llama, mistral"):
        import_hf_lm(bad)
    (bad / "config.json").write_text(json.dumps(config))
    (bad / "model.safetensors").rename(bad / "pytorch_model.bin")
    with pytest.raises(BundleError, match="only pickled weights"):
        import_hf_lm(bad)
    (bad / "pytorch_model.bin").rename(bad / "model.safetensors")
    (bad / "config.json").write_text(json.dumps({**config, "pad_token_id": -1}))  # older conversions' "none"
    assert import_hf_lm(bad).config.tokenizer.pad == "</s>"
    (bad / "config.json").write_text(json.dumps(config))
    (tmp_path / "a-file").write_text("")
    with pytest.raises(BundleError, match="is a file, not a folder"):
        largo.import_lm(bad, tmp_path / "a-file")
    with pytest.raises(BundleError, match="context 4096 exceeds the model's 256 positions"):
        import_hf_lm(folders["mistral"], context=4096)
    (bad / "config.json").write_text(
        json.dumps({**config, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    )
    with pytest.raises(BundleError, match="RoPE scaling 'yarn' is not supported"):
        import_hf_lm(bad)
    with pytest.raises(
        BundleError, match="does not make a valid model: context: .*greater than or equal to 8"
    ):
        import_hf_lm(folders["mistral"], context=4)
    (bad / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 3}))
    with pytest.raises(BundleError, match="kv_heads \\(3\\) must divide heads \\(4\\)"):
        import_hf_lm(bad)
    (bad / "config.json").write_text(json.dumps({**config, "vocab_size": 300}))
    with pytest.raises(
        BundleError, match="tokenizer.json has 320 tokens, more than the model's vocab_size of 300"
    ):
        import_hf_lm(bad)


def test_every_eos_id_ends_a_generation(folders, tmp_path):
    """A chat model lists several eos ids (Llama 3 Instruct: end of text, end of turn): the first ends
    documents, and any of them ends a generation, as transformers' generate stops."""
    folder = tmp_path / "chat"
    shutil.copytree(folders["qwen2"], folder)
    gen = TextGenerator(import_hf_lm(folder))
    free = list(gen.stream_ids("the cat", 40, temperature=0, stop_at_eot=False))
    stop = next(t for t in free[3:] if t != 1)  # a token it generates after a few steps
    generation = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**generation, "eos_token_id": [1, stop]}))
    chat = TextGenerator(import_hf_lm(folder))
    assert chat.config.tokenizer.stop == [chat.tokenizer.id_to_token(stop)] and chat.eot == 1
    ours = list(chat.stream_ids("the cat", 40, temperature=0))
    assert ours == free[: free.index(stop)]
    with torch.no_grad():
        ids = torch.tensor([chat.encode("the cat")])
        theirs = hf_model(folder).generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False
        )
    assert theirs[0, ids.shape[1] :].tolist() == [
        *ours,
        stop,
    ]  # transformers yields the stop token, largo does not


def _fine_tune(folder: Path, runs: Path, corpus: Path, **train: object) -> dict:
    return {
        "name": "tuned",
        "runs_dir": str(runs),
        "data": {"paths": [str(corpus)], "valid": 0.25},
        "train": {
            "steps": 30,
            "micro_batch": 8,
            "eval_every": 10,
            "progress": False,
            "precision": "fp32",
            "init_from": str(folder),
            **train,
        },
    }


def test_init_from_a_hugging_face_folder_fine_tunes_it(folders, tmp_path, corpus):
    config = _fine_tune(folders["mistral"], tmp_path / "runs", corpus, optimizer={"lr": 3e-3})
    result = largo.pretrain({**config, "model": {"context": 64}})  # shorter than the imported 256
    history = [r["valid.loss"] for r in result.metrics["history"] if "valid.loss" in r]
    assert len(history) == 3 and history[-1] < 0.8 * history[0]  # measured: 4.0 → 2.9 nats
    tuned = largo.load(result.path)
    assert tuned.eot == 1 and tuned.config.tokenizer.eot == "</s>"  # the base's end of text kept
    assert tuned.config.model.kv_heads == 2 and tuned.config.model.tie_embeddings is False
    assert tuned.context == 64
    shorter = {**config, "train": {**config["train"], "init_from": str(result.path), "steps": 2}}
    assert (
        largo.load(largo.pretrain({**shorter, "model": {"context": 32}}).path).context == 32
    )  # a bundle too


def test_lora_on_a_hugging_face_folder_changes_only_the_adapted_layers(folders, tmp_path, corpus):
    pytest.importorskip("peft")
    lora = {"rank": 4, "alpha": 8, "targets": ["qkv", "proj"], "save": "merged"}
    config = _fine_tune(folders["llama"], tmp_path / "runs", corpus, steps=10, lora=lora)
    tuned = largo.load(largo.pretrain(config).path)
    assert tuned.chat_template.source == CHAT["llama"]  # the instruct model's template stays with it
    base = import_hf_lm(folders["llama"])
    ours = tuned.model.state_dict()
    changed = {k for k, v in base.model.state_dict().items() if not torch.equal(v, ours[k])}
    assert changed == {f"blocks.{i}.attn.{p}.weight" for i in range(2) for p in ("qkv", "proj")}
    adapter = {**config, "train": {**config["train"], "lora": {**lora, "save": "adapter"}}}
    with pytest.raises(largo.ConfigError, match="adapter needs a largo LM bundle"):
        largo.pretrain(adapter)
    assert sorted(p.name for p in (tmp_path / "runs" / "tuned").iterdir()) == ["v1"]  # no empty v2 left


def test_sharded_bf16_checkpoints_in_the_transformers_4_layout_convert(folders, tmp_path):
    folder = tmp_path / "sharded"
    model = hf_model(folders["llama"]).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="40KB")
    shutil.copy(folders["llama"] / "tokenizer.json", folder)
    config = json.loads((folder / "config.json").read_text())
    assert (folder / "model.safetensors.index.json").exists() and "rope_parameters" in config
    old = {k: v for k, v in config.items() if k != "rope_parameters"}  # rope_theta + rope_scaling apart
    scaling = {k: v for k, v in config["rope_parameters"].items() if k != "rope_theta"}
    old |= {"rope_theta": config["rope_parameters"]["rope_theta"], "rope_scaling": scaling}
    (folder / "config.json").write_text(json.dumps(old))
    bundle = import_hf_lm(folder)
    assert bundle.config.model.rope_scaling is not None
    ids = torch.tensor([bundle.tokenizer.encode(TEXT, add_special_tokens=False).ids])
    with torch.no_grad():
        want = model.float()(ids).logits  # the bf16 weights, computed in fp32 as largo holds them
        torch.testing.assert_close(bundle.model(ids), want, atol=1e-4, rtol=0)


def test_an_imported_model_is_the_text_encoder_of_a_classifier(folders, tmp_path):
    from largo.config import validate_config
    from largo.data.features import make_processor

    out = largo.import_lm(folders["qwen2"], tmp_path / "qwen", context=64)
    config = {
        "data": {"train": "unused.csv"},
        "inputs": [{"name": "text", "type": "text", "encoder": {"from": str(out)}}],
        "outputs": [{"name": "label", "type": "category"}],
    }
    proc = make_processor(validate_config(config).inputs[0], False)
    proc.fit(["the cat sat", "the dog ran to the park"])
    assert proc.pad_id == 1  # the model's padding: its end of text, as config.tokenizer.pad says
    ids = proc.encode(["the cat sat", "the dog ran to the park"])
    assert ids.shape[1] == len(proc.tokenizer.encode("the dog ran to the park").ids) and ids[0, -1] == 1
    from largo.config import LmEncoderConfig
    from largo.models.zoo import PRETRAINED_TEXT_ENCODERS

    encoder = PRETRAINED_TEXT_ENCODERS["lm"](
        LmEncoderConfig.model_validate({"from": str(out)}), 1, 0.0
    ).eval()
    base = import_hf_lm(folders["qwen2"], context=64).model
    with torch.no_grad():
        pooled = encoder(ids)
        real = ids[:1, : len(proc.tokenizer.encode("the cat sat").ids)].long()  # the padding left out
        torch.testing.assert_close(pooled[0], base.hidden(real)[0].mean(0), atol=1e-5, rtol=0)


def test_a_bf16_checkpoint_is_stored_in_bf16_and_loads_exactly(folders, tmp_path):
    from safetensors import safe_open

    folder = tmp_path / "bf16"
    hf_model(folders["qwen2"]).to(torch.bfloat16).save_pretrained(folder)
    shutil.copy(folders["qwen2"] / "tokenizer.json", folder)
    bundle = import_hf_lm(folder)
    ids = torch.tensor([bundle.tokenizer.encode(TEXT, add_special_tokens=False).ids])
    with torch.no_grad():
        before = bundle.model(ids)
    out = largo.import_lm(folder, tmp_path / "runs" / "q" / "v1")
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118
    size = (out / "model.safetensors").stat().st_size
    assert size < 1.2 * (folder / "model.safetensors").stat().st_size  # not the fp32 double
    loaded = largo.load(out).model
    assert loaded.embed.weight.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(loaded(ids), before)  # bf16 values in fp32: nothing rounded
    fp32 = largo.import_lm(folders["qwen2"], tmp_path / "fp32")
    assert json.loads((fp32 / "metrics.json").read_text())["imported"]["dtype"] == "float32"


MESSAGES = [
    {"role": "system", "content": "you answer in 中文"},
    {"role": "user", "content": "the cat sat on"},
    {"role": "assistant", "content": "the mat"},
    {"role": "user", "content": "and the dog?"},
]


@pytest.mark.parametrize("family", list(CHAT))
def test_chat_messages_become_the_prompt_transformers_lays_out(folders, family, tmp_path):
    out = largo.import_lm(folders[family], tmp_path / family)
    assert json.loads((out / "chat_template.json").read_text())["template"] == CHAT[family]
    gen = largo.load(out)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folders[family])
    want = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    prompt = gen.chat_prompt(MESSAGES)
    assert prompt == want
    assert gen.encode(prompt) == tokenizer(want, add_special_tokens=False)["input_ids"]  # one <s>, not two
    assert gen.chat(MESSAGES, 8, temperature=0) == gen.generate(prompt, 8, temperature=0)
    if family == "llama":
        with pytest.raises(ValueError, match="^a conversation starts with the user$"):
            gen.chat_prompt([{"role": "assistant", "content": "hi"}])
    with pytest.raises(ValueError, match="messages.0: an object with string role and content"):
        gen.chat_prompt([{"role": "user"}])


def test_chat_templates_get_what_transformers_gives_them(folders, tmp_path):
    """Loop controls, {% generation %}, tojson's arguments, the special tokens and a message's other
    keys render as in transformers; a template error is a ValueError; one that does not compile is
    refused at import."""
    folder = tmp_path / "chat"
    shutil.copytree(folders["qwen2"], folder)
    template = (
        "{% for m in messages %}{% if m['role'] == 'skip' %}{% continue %}{% endif %}"
        "{% generation %}{{ m['role'] }}({{ m.get('name', '-') }}): "
        "{{ m['content'] | tojson(sort_keys=True) }}"
        "{% endgeneration %}{{ eos_token }}{% endfor %}{{ bos_token }}|{{ pad_token }}|{{ unk_token }}"
    )
    tokens = {"bos_token": "<s>", "eos_token": {"__type": "AddedToken", "content": "</s>"}}
    tokens |= {"pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps({**tokens, "chat_template": template}))
    messages = [{"role": "user", "content": "你好", "name": "ann"}, {"role": "skip", "content": "x"}]
    want = transformers.AutoTokenizer.from_pretrained(folder).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    gen = TextGenerator(import_hf_lm(folder))
    assert gen.chat_prompt(messages) == want == 'user(ann): "你好"</s><s>|<pad>|<unk>'
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ 'a' + 1 }}"}))
    with pytest.raises(ValueError, match="the chat template failed: TypeError"):
        TextGenerator(import_hf_lm(folder)).chat_prompt(messages)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for m in messages %}"}))
    with pytest.raises(BundleError, match="the chat template does not compile"):
        import_hf_lm(folder)


def test_chat_from_the_cli_and_the_server(folders, tmp_path):
    from largo.deploy.generate_service import create_generate_app
    from largo.deploy.server import serve_in_thread

    out = largo.import_lm(folders["qwen2"], tmp_path / "chat")
    plain = largo.import_lm(folders["mistral"], tmp_path / "plain")  # no template
    runner = CliRunner()
    said = runner.invoke(app, ["generate", str(out), "the cat", "--chat", "-n", "6", "--temperature", "0"])
    gen = largo.load(out)
    expected = gen.chat([{"role": "user", "content": "the cat"}], 6, temperature=0)
    assert said.exit_code == 0 and said.output.rstrip("\n") == expected
    refused = runner.invoke(app, ["generate", str(plain), "hi", "--chat"])
    assert refused.exit_code == 2 and "this model has no chat template" in refused.output

    body = {"messages": MESSAGES, "max_new_tokens": 6, "temperature": 0}
    with serve_in_thread(create_generate_app(gen)) as url:
        answer = httpx.post(f"{url}/generate", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.json()["text"] == gen.chat(MESSAGES, 6, temperature=0)
        both = httpx.post(f"{url}/generate", json={**body, "prompt": "hi"})
        assert both.status_code == 422 and "prompt or messages" in both.text
        bad = httpx.post(f"{url}/generate", json={**body, "messages": [{"role": "user"}]})
        assert bad.status_code == 422 and "content" in bad.text
    with serve_in_thread(create_generate_app(largo.load(plain))) as url:
        none = httpx.post(f"{url}/generate", json=body)
        assert none.status_code == 422 and "no chat template" in none.text


ZEPHYR = (  # each turn ends with the eos itself, and no <s> is written
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def with_template(folder: Path, copy: Path, template: str) -> Path:
    """A copy of a model folder whose tokenizer_config.json holds `template` (eos_token </s>)."""
    shutil.copytree(folder, copy)
    (copy / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "chat_template": template}))
    return copy


def test_a_chat_template_decides_where_the_bos_token_goes(folders, tmp_path):
    """Zephyr-style templates write no <s> on a model whose tokenizer adds one: transformers feeds the
    template's tokens as they are, and so does largo (a plain prompt still gets its <s>)."""
    folder = with_template(folders["llama"], tmp_path / "zephyr", ZEPHYR)
    gen = TextGenerator(import_hf_lm(folder))
    messages = [{"role": "user", "content": "the cat"}]
    want = transformers.AutoTokenizer.from_pretrained(folder).apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    assert gen.encode(gen.chat_prompt(messages)) == list(want) and want[0] != gen.bos
    assert gen.encode(str(gen.chat_prompt(messages)))[0] == gen.bos  # the same text as a plain prompt


def test_an_instruct_model_fine_tunes_on_conversations(folders, tmp_path):
    """data.messages_field: each record is a conversation laid out by the base's chat template; the
    last (assistant) turn with the template's end of turn is the only target (the end-of-text token
    after it only when that end holds no stopping token), and the tuned model gives it back."""
    from largo.data.corpus import open_tokens

    qa = [("where did the cat sit?", "on the mat"), ("今天天气怎么样？", "天气很好"), ("who ran?", "the dog")]
    system = {"role": "system", "content": "be brief"}
    records = [
        {"messages": [system, {"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in qa * 40
    ]
    corpus = tmp_path / "chats.jsonl"
    corpus.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")

    def layout(folder: Path, runs: Path, steps: int) -> tuple[Path, list[int], list[int]]:
        config = _fine_tune(folder, runs, corpus, steps=steps, optimizer={"lr": 1e-2})
        config["data"] |= {"messages_field": "messages", "valid": 0.1}
        result = largo.pretrain({**config, "model": {"context": 128}})  # the markers are bytes here
        tokens = open_tokens(next((runs / ".cache" / "tokens").iterdir()))
        n = int(np.flatnonzero(tokens.train_mask[1:] < tokens.train_mask[:-1])[0]) + 1  # the first record
        return result.path, tokens.train[:n].tolist(), tokens.train_mask[:n].tolist()

    # ChatML in this toy tokenizer: <|im_end|> is text, not a stopping token, so </s> follows it
    base = TextGenerator(import_hf_lm(folders["qwen2"]))
    _, ids, mask = layout(folders["qwen2"], tmp_path / "runs", 1)
    first = base.encode(base.chat_prompt(records[0]["messages"][:-1]))
    answer = base.tokenizer.encode("on the mat<|im_end|>\n", add_special_tokens=False).ids
    assert ids == [*first, *answer, base.eot]  # prompt, answer and the template's end of turn, </s>
    assert mask == [0] * len(first) + [1] * (len(answer) + 1)  # the answer only

    # a template that ends each turn with the eos itself (Zephyr): nothing is added after it
    zephyr = with_template(folders["qwen2"], tmp_path / "zephyr", ZEPHYR)
    path, ids, _ = layout(zephyr, tmp_path / "runs-z", 60)
    end = base.tokenizer.encode("on the mat</s>\n", add_special_tokens=False).ids
    assert ids[-len(end) :] == end and end.count(base.eot) == 1
    tuned = largo.load(path)
    for q, a in qa:
        chat = [system, {"role": "user", "content": q}]
        assert tuned.chat(chat, 10, temperature=0) == a  # learned, and it stops at the end of turn
    config = _fine_tune(zephyr, tmp_path / "runs-z", corpus)
    config["data"] |= {"messages_field": "messages"}
    broken = tmp_path / "broken.jsonl"
    broken.write_text(
        json.dumps(records[0]) + "\n" + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n"
    )
    config["data"]["paths"] = [str(broken)]
    with pytest.raises(largo.DataError, match="broken.jsonl:2: expected an object whose 'messages'"):
        largo.pretrain(config)
    both = {**config, "data": {**config["data"], "prompt_field": "q"}}
    with pytest.raises(
        largo.ConfigError, match="data.messages_field: a corpus of conversations has no prompt_field"
    ):
        largo.pretrain(both)
    plain = _fine_tune(folders["mistral"], tmp_path / "runs2", corpus)
    plain["data"] |= {"messages_field": "messages"}
    with pytest.raises(largo.DataError, match="laid out by a chat template; train.init_from must name"):
        largo.pretrain(plain)
