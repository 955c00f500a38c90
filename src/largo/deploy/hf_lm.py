"""A local Hugging Face causal LM folder (Llama, Mistral, Qwen2 families) as a largo GPT.

Those architectures are largo's GPT block for block (RMSNorm, RoPE rotating half-channels, SwiGLU,
causal attention), with grouped-query attention, biases on the query/key/value projection (Qwen2) and
an untied output layer as `GPTConfig` options. So a checkpoint converts by renaming tensors and
concatenating q, k and v; transformers is not needed. Weights are read with safetensors (one file or
a sharded index), never unpickled: a folder with only `pytorch_model.bin` is refused.

`import_hf_lm(folder)` returns an `LMBundle` in memory (what `train.init_from` continues from);
`write_imported(bundle, out)` writes it as a largo LM bundle, which then generates, serves, exports,
fine-tunes (LoRA too) and updates like a pretrained one (`largo import FOLDER --out DIR`).

The end-of-text token is the model's eos (`tokenizer.eot`); when the tokenizer's post-processor puts
a beginning-of-text token first (Llama, Mistral), it becomes `tokenizer.bos`, which largo puts before
every prompt and fine-tuning document itself (it encodes text without the post-processor), and the
model's other eos ids end generations too (`tokenizer.stop`). An instruct model's chat template comes
along (chat_template.json, see deploy/chat.py). Not kept: positions beyond `context` (default 2048:
each served row preallocates its KV cache for the whole context).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import safe_open
from tokenizers import Tokenizer

from largo.config_lm import GPTConfig, validate_lm_config
from largo.deploy.chat import read_hf_chat
from largo.deploy.metadata import BundleError

HF_LM_TYPES = ("llama", "mistral", "qwen2")  # config.json model_type values that convert
DEFAULT_CONTEXT = 2048  # the imported context when none is asked for (capped by the model's own)


def is_hf_folder(path: str | Path) -> bool:
    """A Hugging Face model folder (config.json), not a largo bundle (config.yaml)."""
    folder = Path(path)
    return (folder / "config.json").is_file() and not (folder / "config.yaml").is_file()


def _fail(folder: Path, why: str) -> BundleError:
    return BundleError(f"Hugging Face folder {str(folder)!r}: {why}")


def _rope(hf: dict[str, Any], folder: Path) -> tuple[float, dict[str, Any] | None]:
    """(RoPE theta, largo's rope_scaling) from config.json: transformers 5 keeps both in
    `rope_parameters`, earlier versions `rope_theta` and `rope_scaling` apart."""
    params = dict(hf.get("rope_parameters") or {})
    theta = float(hf.get("rope_theta") or params.pop("rope_theta", None) or 10_000.0)
    scaling = hf.get("rope_scaling") or params
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, {"kind": "linear", "factor": float(scaling["factor"])}
    if kind == "llama3":
        return theta, {
            "kind": "llama3",
            "factor": float(scaling["factor"]),
            "low_freq_factor": float(scaling["low_freq_factor"]),
            "high_freq_factor": float(scaling["high_freq_factor"]),
            "original_context": int(scaling["original_max_position_embeddings"]),
        }
    raise _fail(folder, f"RoPE scaling {kind!r} is not supported (default, linear and llama3 are)")


def hf_gpt_config(hf: dict[str, Any], folder: Path, context: int | None = None) -> GPTConfig:
    """The `GPTConfig` of a Hugging Face causal LM's config.json; BundleError naming what does not
    convert (another architecture, activation, head size, MLP biases, RoPE scaling)."""
    kind = hf.get("model_type")
    if kind not in HF_LM_TYPES:
        raise _fail(folder, f"model_type {kind!r} does not convert; supported: {', '.join(HF_LM_TYPES)}")
    if hf.get("hidden_act", "silu") != "silu":
        raise _fail(folder, f"hidden_act {hf['hidden_act']!r}: only silu (SwiGLU) converts")
    if hf.get("mlp_bias"):
        raise _fail(folder, "mlp_bias: MLP biases do not convert")
    dim, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    if int(hf.get("head_dim") or dim // heads) * heads != dim:
        raise _fail(folder, f"head_dim {hf.get('head_dim')} × {heads} heads ≠ hidden_size {dim}")
    most = int(hf.get("max_position_embeddings") or DEFAULT_CONTEXT)
    window = hf.get("sliding_window") if hf.get("use_sliding_window", kind == "mistral") else None
    if window:  # within the window, sliding-window attention is full causal attention
        most = min(most, int(window))
    if context is not None and context > most:
        raise _fail(folder, f"context {context} exceeds the model's {most} positions")
    theta, scaling = _rope(hf, folder)
    bias = bool(hf.get("attention_bias", False))
    sizes = {
        "dim": dim,
        "layers": int(hf["num_hidden_layers"]),
        "heads": heads,
        "kv_heads": int(hf.get("num_key_value_heads") or heads),
        "ff_dim": int(hf["intermediate_size"]),
        "context": context or min(most, DEFAULT_CONTEXT),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "qkv_bias": bias or kind == "qwen2",
        "proj_bias": bias,
        "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "vocab_size": int(hf["vocab_size"]),
    }
    try:
        return GPTConfig(**sizes)
    except ValidationError as e:
        problem = e.errors()[0]
        where = ".".join(map(str, problem["loc"])) or "model"
        raise _fail(folder, f"it does not make a valid model: {where}: {problem['msg']}") from None


class _Tensors:
    """The folder's safetensors, one file or shards named by model.safetensors.index.json."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            self.files = {name: folder / file for name, file in weight_map.items()}
        elif (folder / "model.safetensors").is_file():
            with safe_open(folder / "model.safetensors", "pt") as f:
                self.files = {name: folder / "model.safetensors" for name in f.keys()}  # noqa: SIM118
        else:
            why = "no model.safetensors or model.safetensors.index.json"
            if any(folder.glob("pytorch_model*.bin*")):
                why += "; it has only pickled weights (pytorch_model.bin), which largo does not load"
            raise _fail(folder, why)
        self.folder = folder
        self.dtypes: set[torch.dtype] = set()  # of the tensors read

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise _fail(self.folder, f"the weights lack {name}")
        with safe_open(self.files[name], "pt") as f:
            tensor = f.get_tensor(name)
        self.dtypes.add(tensor.dtype)
        return tensor.float()


def hf_gpt_state(tensors: _Tensors, cfg: GPTConfig) -> dict[str, torch.Tensor]:
    """The GPT state dict of a Llama-family checkpoint: renamed, q/k/v concatenated, fp32."""
    prefix = "model." if "model.embed_tokens.weight" in tensors else ""
    state = {
        "embed.weight": tensors.get(f"{prefix}embed_tokens.weight"),
        "norm.weight": tensors.get(f"{prefix}norm.weight"),
    }
    for i in range(cfg.layers):
        hf, ours = f"{prefix}layers.{i}.", f"blocks.{i}."
        attn = hf + "self_attn."
        state[ours + "norm1.weight"] = tensors.get(hf + "input_layernorm.weight")
        state[ours + "norm2.weight"] = tensors.get(hf + "post_attention_layernorm.weight")
        state[ours + "attn.qkv.weight"] = torch.cat([tensors.get(f"{attn}{p}_proj.weight") for p in "qkv"])
        if cfg.qkv_bias:
            state[ours + "attn.qkv.bias"] = torch.cat([tensors.get(f"{attn}{p}_proj.bias") for p in "qkv"])
        state[ours + "attn.proj.weight"] = tensors.get(attn + "o_proj.weight")
        if cfg.proj_bias:
            state[ours + "attn.proj.bias"] = tensors.get(attn + "o_proj.bias")
        for theirs, mine in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
            state[f"{ours}mlp.{mine}.weight"] = tensors.get(f"{hf}mlp.{theirs}.weight")
    if cfg.tie_embeddings:
        state["head.weight"] = state["embed.weight"]
    else:
        state["head.weight"] = tensors.get("lm_head.weight")
    return state


def _token_ids(value: Any) -> list[int]:
    """A config's token id setting (an id, a list of ids, or null) as a list; a negative id (older
    conversions write -1 for none) is left out."""
    ids = value if isinstance(value, list) else [value]
    return [v for v in ids if isinstance(v, int) and not isinstance(v, bool) and v >= 0]


def _special_tokens(folder: Path, hf: dict[str, Any], tokenizer: Tokenizer) -> dict[str, Any]:
    """config.tokenizer's eot, stop and pad: the first eos id of generation_config.json (else of
    config.json) ends documents, the others end generations too (a chat model's end of turn); the pad
    is the model's pad token, else the end-of-text token (a classifier reading the LM masks it out)."""
    generation = folder / "generation_config.json"
    generated = json.loads(generation.read_text(encoding="utf-8")) if generation.is_file() else {}

    def setting(key: str) -> list[int]:
        return _token_ids(generated.get(key)) or _token_ids(hf.get(key))

    names = [tokenizer.id_to_token(i) for i in setting("eos_token_id")]
    if not names or None in names:
        raise _fail(folder, "no eos_token_id the tokenizer knows in generation_config.json or config.json")
    pads = [tokenizer.id_to_token(i) for i in setting("pad_token_id")]
    pad = pads[0] if pads and pads[0] is not None else names[0]
    return {"eot": names[0], "stop": list(dict.fromkeys(n for n in names[1:] if n != names[0])), "pad": pad}


def _bos(tokenizer: Tokenizer) -> str | None:
    """The beginning-of-text token the tokenizer's post-processor puts first (Llama, Mistral), which
    largo then puts before every document and prompt itself; None when it adds none (Qwen2)."""
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    marked = tokenizer.encode("a", add_special_tokens=True).ids
    if len(marked) > len(plain) and marked[1 : 1 + len(plain)] == plain:
        return tokenizer.id_to_token(marked[0])
    return None


def import_hf_lm(folder: str | Path, context: int | None = None, name: str | None = None) -> Any:
    """A Hugging Face causal LM folder as an `LMBundle` (model in eval mode, fp32) whose path is the
    folder; BundleError naming the folder and what does not convert."""
    from largo.deploy.generator import LMBundle
    from largo.models.gpt import GPT

    folder = Path(folder)
    if not is_hf_folder(folder):
        raise _fail(folder, "not a Hugging Face model folder (no config.json)")
    hf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    tensors = _Tensors(folder)
    if "tie_word_embeddings" not in hf:  # transformers' default is untied; a checkpoint without an
        hf["tie_word_embeddings"] = "lm_head.weight" not in tensors  # output layer can only be tied
    cfg = hf_gpt_config(hf, folder, context)
    if not (folder / "tokenizer.json").is_file():
        raise _fail(
            folder,
            "no tokenizer.json (a sentencepiece tokenizer.model alone does not load without transformers; "
            "save one with AutoTokenizer.from_pretrained(folder).save_pretrained(folder))",
        )
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        raise _fail(
            folder,
            f"tokenizer.json has {tokenizer.get_vocab_size()} tokens, more than the model's "
            f"vocab_size of {cfg.vocab_size}",
        )
    special = _special_tokens(folder, hf, tokenizer)
    try:
        chat = read_hf_chat(folder)  # before the weights: a template that does not compile is refused
    except ValueError as e:
        raise _fail(folder, str(e)) from None
    state = hf_gpt_state(tensors, cfg)
    with torch.device("meta"):  # no random init of weights about to be replaced
        model = GPT(cfg)
    try:
        model.load_state_dict(state, assign=True)  # the converted tensors become the weights: no copy
    except RuntimeError as e:
        raise _fail(folder, f"its weights do not match config.json: {e}") from None
    if cfg.tie_embeddings:
        model.head.weight = model.embed.weight
    model.reset_rope("cpu")
    config = validate_lm_config(
        {
            "name": name or folder.name,
            "data": {"paths": []},  # nothing of the corpus it was pretrained on is here
            "tokenizer": {**special, "bos": _bos(tokenizer)},
            "model": cfg.model_dump(mode="json"),
        },
        str(folder / "config.json"),
    )
    metrics = {
        "name": config.name,
        "task": "lm",
        "parameters": model.num_parameters(),
        "imported": {
            "from": str(folder.resolve()),
            "model_type": hf.get("model_type"),
            "architectures": hf.get("architectures"),
            "max_position_embeddings": hf.get("max_position_embeddings"),
            "context": cfg.context,
            # what write_imported stores: bf16 when every tensor was (fp32 holds them exactly), else fp32
            "dtype": "bfloat16" if tensors.dtypes == {torch.bfloat16} else "float32",
            **config.tokenizer.model_dump(include={"eot", "bos", "pad", "stop"}),
        },
        "config": config.model_dump(mode="json"),
    }
    return LMBundle(folder, config, tokenizer, model.eval(), metrics, chat)


def write_imported(bundle: Any, out: str | Path) -> Path:
    """Write an imported `LMBundle` as a largo LM bundle into a new or empty folder `out` (config.yaml,
    tokenizer.json, model.safetensors, metrics.json, report.html); returns the folder. The weights are
    stored in bf16 when the checkpoint's were (no bigger than it and exact: a bundle's weights load
    into the fp32 model whatever their dtype), else in fp32."""
    from largo.deploy.generator import write_lm_bundle, write_lm_start

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BundleError(f"{out} is a file, not a folder for the bundle")
    if out.exists() and (out.resolve() == bundle.path.resolve() or any(out.iterdir())):
        raise BundleError(f"{out} is not empty (it would overwrite files); choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    write_lm_start(out, bundle.config, bundle.tokenizer, bundle.chat_template)
    dtype = torch.bfloat16 if bundle.metrics["imported"]["dtype"] == "bfloat16" else torch.float32
    params = list(bundle.model.parameters())  # the weights only: RoPE's tables stay fp32
    try:
        for p in params:
            p.data = p.data.to(dtype)
        write_lm_bundle(out, bundle.model, {**bundle.metrics, "version": out.name})
    finally:
        for p in params:
            p.data = p.data.float()  # exact: the values were bf16 to begin with
    return out
