"""LoRA fine-tuning through peft: low-rank adapters beside frozen Linear layers, merged or kept apart.

`add_lora(model, cfg)` puts a LoRA adapter (y = W x + alpha / rank · B A x, with B starting at zero so
the adapted model starts out exactly as the base) on every Linear layer that `cfg.targets` names, and
freezes what it adapts:
- a largo GPT as a whole: every base weight (the tied embedding included) is frozen, only adapters train;
- a classifier (FeatureModel): the body of each pretrained text encoder (a Hugging Face model, or a
  largo GPT read from an LM bundle) is frozen and adapted, while the layers the run creates (other
  encoders, combiner, heads) train as usual.

`merge_lora` folds the adapters into the weights and removes peft's wrappers, so the state dict has the
base architecture's keys again and the bundle loads with the ordinary readers. `adapter_state_dict` and
`load_adapter` are the two halves of an adapter-only LM bundle (deploy/generator.py writes and reads it).

peft is an optional extra (`pip install "largo[lora]"`), imported only when LoRA is used. We call its
`inject_adapter_in_model` on our own modules rather than wrapping them in a PeftModel, so the model keeps
its class and methods (GPT.new_cache, FeatureModel.forward(batch)), and parameter names are the base
names plus peft's `.base_layer` / `.lora_A.default` / `.lora_B.default` parts — what a LoRA run's
checkpoints hold, so resuming works as for any run.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import nn

from largo.config import ConfigError, LoraConfig
from largo.models.gpt import GPT
from largo.train.distributed import log

INSTALL_HINT = 'pip install "largo[lora]"'
ADAPTER = "default"  # peft's adapter name: one adapter per model here


def import_peft() -> Any:
    """The peft module, or an ImportError that says how to install it."""
    try:
        import peft
    except ImportError as e:
        raise ImportError(f"train.lora needs the peft package: {INSTALL_HINT}") from e
    return peft


def lora_hosts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs that take adapters: a GPT as a whole, or each pretrained encoder's body.

    A pretrained encoder is a module that sets `lr_scale` (what train/optim.py reads); its body is its
    `model` (a Hugging Face model, models/pretrained.py) or its `body` (a largo GPT, models/lm_encoder.py).
    Raises ConfigError when the model has nothing pretrained to adapt.
    """
    if isinstance(model, GPT):
        return [("", model)]
    hosts = []
    for name, m in model.named_modules():
        if getattr(m, "lr_scale", None) is None:
            continue
        attr = next((a for a in ("model", "body") if isinstance(getattr(m, a, None), nn.Module)), None)
        if attr is not None:
            hosts.append((f"{name}.{attr}" if name else attr, getattr(m, attr)))
    if not hosts:
        raise ConfigError(
            "train.lora: the model has no pretrained part to put adapters on; LoRA fine-tunes a text input "
            "with a pretrained encoder (`pretrained: <Hugging Face folder>` or `encoder: {from: <LM "
            "bundle>}`), or with `largo pretrain` the LM bundle of train.init_from"
        )
    return hosts


def _linear_layers(host: nn.Module) -> tuple[dict[str, nn.Linear], set[str]]:
    """(Linear layers that may take an adapter, by full name; names of Linear layers with a shared weight).

    A layer whose weight another module shares (a GPT's head is tied to its embedding) is left out:
    merging an update into it would change the other module too.
    """
    owners = Counter(id(p) for m in host.modules() for p in m.parameters(recurse=False))
    free: dict[str, nn.Linear] = {}
    tied: set[str] = set()
    for name, m in host.named_modules():
        if isinstance(m, nn.Linear):
            if owners[id(m.weight)] == 1:
                free[name] = m
            else:
                tied.add(name)
    return free, tied


def _matches(name: str, target: str) -> bool:
    # peft's rule for a list of target names: the full name, or its last dotted parts
    return name == target or name.endswith("." + target)


def match_targets(host: nn.Module, targets: list[str]) -> list[str]:
    """Full names of the Linear layers of `host` that `targets` name (a last name part such as "qkv", or
    a dotted tail such as "attn.qkv"), in model order.

    Raises ConfigError naming the allowed names when a target matches no layer.
    """
    layers, tied = _linear_layers(host)
    unmatched = [t for t in targets if not any(_matches(n, t) for n in layers)]
    if unmatched:
        allowed = sorted({n.rsplit(".", 1)[-1] for n in layers})
        shared = [t for t in unmatched if any(_matches(n, t) for n in tied)]
        note = f" ({', '.join(shared)}: its weight is tied to another layer's)" if shared else ""
        raise ConfigError(
            f"train.lora.targets: {', '.join(map(repr, unmatched))} match no Linear layer of the "
            f"model{note}; allowed: {', '.join(allowed)}"
        )
    return [n for n in layers if any(_matches(n, t) for t in targets)]


def add_lora(model: nn.Module, cfg: LoraConfig, *, quiet: bool = False) -> nn.Module:
    """Put LoRA adapters on the target Linear layers and freeze the weights they adapt (in place).

    Args:
        model: a GPT (all base weights frozen) or a FeatureModel with pretrained text encoders (their
            bodies frozen; everything else keeps training).
        cfg: rank, alpha, dropout and target layer names.
        quiet: do not log the trainable parameter count.

    Returns:
        The same model object, with peft LoRA layers in place of the target layers.
    """
    peft = import_peft()
    for _, host in lora_hosts(model):
        names = match_targets(host, cfg.targets)
        # exact full names, so peft adapts exactly the layers checked above and nothing else
        config = peft.LoraConfig(
            r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=names, bias="none"
        )
        peft.inject_adapter_in_model(config, host, adapter_name=ADAPTER)
    for m in model.modules():
        if getattr(m, "lr_scale", None) is not None:
            # lr_scale keeps a fine-tuned pretrained body close to its weights; under LoRA the body is
            # frozen and the encoder's only trainable weights are the new adapters, which need the full lr
            m.lr_scale = 1.0
    if not quiet:
        s = lora_summary(model)
        log(
            f"LoRA rank {cfg.rank} on {s['adapted_layers']} layers: {s['trainable_parameters']:,} of "
            f"{s['total_parameters']:,} parameters train ({s['trainable_share']:.2%}; adapters "
            f"{s['adapter_parameters']:,})"
        )
    return model


def lora_summary(model: nn.Module) -> dict[str, Any]:
    """Parameter counts of an adapted model: adapters, all trainable, total, the trainable share."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    named = dict(model.named_parameters())  # a tied weight once
    adapters = sum(p.numel() for n, p in named.items() if ".lora_" in n)
    trainable = sum(p.numel() for p in named.values() if p.requires_grad)
    total = sum(p.numel() for p in named.values())
    return {
        "adapted_layers": sum(isinstance(m, BaseTunerLayer) for m in model.modules()),
        "adapter_parameters": adapters,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_share": trainable / max(1, total),
    }


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer's weight and drop peft's wrappers (in place).

    Returns the model, now plain: its state dict has exactly the keys of the base architecture.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in wrapped:
        layer.merge()  # W += alpha / rank · B A, in the weight's own dtype and device
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.get_base_layer())
    for m in model.modules():
        if "peft_config" in vars(m):  # the record inject_adapter_in_model leaves on each host
            del m.peft_config
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights, in peft's format (`<layer>.lora_A.weight`, `<layer>.lora_B.weight`), on
    the CPU. Raises ValueError when the model has no adapters."""
    peft = import_peft()
    state: dict[str, torch.Tensor] = {}
    for prefix, host in lora_hosts(model):
        if "peft_config" not in vars(host):
            raise ValueError("the model has no LoRA adapters (add_lora was not called, or they were merged)")
        part = peft.get_peft_model_state_dict(host, adapter_name=ADAPTER, save_embedding_layers=False)
        state |= {_join(prefix, k): v.detach().cpu().contiguous() for k, v in part.items()}
    return state


def load_adapter(model: nn.Module, cfg: LoraConfig, state: dict[str, torch.Tensor]) -> nn.Module:
    """Apply the adapter weights of `adapter_state_dict` to the base model they were trained on, merged.

    Returns the model (changed in place), plain like `merge_lora`'s. Raises ValueError when `state` does
    not fit the adapters that `cfg` puts on this model (other targets, another rank or architecture).
    """
    peft = import_peft()
    with torch.random.fork_rng(devices=[]):  # the adapters' random init is overwritten: keep the caller's RNG
        add_lora(model, cfg, quiet=True)
    for prefix, host in lora_hosts(model):
        expected = {_join(prefix, k) for k in peft.get_peft_model_state_dict(host, adapter_name=ADAPTER)}
        given = {k for k in state if not prefix or k.startswith(prefix + ".")}
        if expected != given:
            missing, extra = sorted(expected - given), sorted(given - expected)
            raise ValueError(
                f"the adapter weights do not fit train.lora (rank {cfg.rank}, targets {cfg.targets}): "
                f"missing {missing[:3]}, unexpected {extra[:3]}"
            )
        part = {k[len(prefix) + 1 :] if prefix else k: state[k] for k in given}
        try:
            peft.set_peft_model_state_dict(host, part, adapter_name=ADAPTER)
        except RuntimeError as e:  # a shape mismatch: another rank or model size
            first = next((line.strip() for line in str(e).splitlines() if "mismatch" in line), str(e))
            raise ValueError(f"the adapter weights do not fit the model: {first}") from None
    return merge_lora(model)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
