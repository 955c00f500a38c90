"""A decoder-only Transformer (GPT) in one sitting: embedding, RoPE, RMSNorm, SwiGLU, causal attention.

tokens [b, t] → embedding (tied with the output layer) → L × (x + attn(norm(x)), x + mlp(norm(x)))
→ norm → logits [b, t, vocab]. Attention is `scaled_dot_product_attention` with the causal flag (flash
/ memory-efficient kernels where the device has them). A `KVCache` keeps each layer's keys and values
so generation costs one token's work per step; `generate_ids` is the sampler (`sample_next`, the cache and
RoPE live in layers.py, shared with the encoder-decoder). `GPTRows` decodes many sequences at positions
of their own in one batch (a server's continuous batching; `SlotKVCache`).
Residual projections start at 0.02 / sqrt(2·layers) (GPT-2), everything else at N(0, 0.02).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from largo.config_lm import GPTConfig
from largo.data.corpus import IGNORE  # a target the loss skips
from largo.models.layers import (
    DecodeRows,
    KVCache,
    SelfAttention,
    SlotKVCache,
    SwiGLU,
    rope_tables,
    sample_next,
)
from largo.models.prefill import PromptReader


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = SelfAttention(cfg.dim, cfg.heads, cfg.dropout, cfg.kv_heads, cfg.qkv_bias, cfg.proj_bias)
        self.norm2 = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.dim, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None, i: int):
        x = x + self.drop(self.attn(self.norm1(x), cos, sin, causal=True, cache=cache, layer=i))
        return x + self.drop(self.mlp(self.norm2(x)))


class GPT(nn.Module):
    """forward(ids) → logits [b, t, vocab]; forward(ids, targets) → (summed loss, counted tokens).

    The loss is a sum over the tokens whose target is not IGNORE, so a training step can divide by the
    token count of all its micro-batches together (see train/lm.py).
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size: not set (it comes from the tokenizer)")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight  # tied input and output embeddings
        self.register_buffer("cos", None, persistent=False)
        self.register_buffer("sin", None, persistent=False)
        self.reset_rope()
        self.own_init = True
        self.reset_parameters()

    def reset_rope(self, device: torch.device | str | None = None) -> None:
        """Compute RoPE's cos and sin tables (buffers, not weights: never saved) for the context, on
        `device` (a model built on the meta device gets real ones this way once its weights are in)."""
        c = self.cfg
        cos, sin = rope_tables(c.dim // c.heads, c.context, c.rope_theta, c.rope_scaling)
        self.cos, self.sin = (t.to(device) if device is not None else t for t in (cos, sin))

    def reset_parameters(self) -> None:
        """GPT-2's init: N(0, 0.02), residual projections scaled down by sqrt(2·layers)."""
        for name, p in self.named_parameters():
            if p.ndim < 2:
                if name.endswith("bias"):
                    nn.init.zeros_(p)
                continue  # norm scales stay 1
            std = (
                0.02 / math.sqrt(2 * self.cfg.layers) if name.endswith(("proj.weight", "w2.weight")) else 0.02
            )
            nn.init.normal_(p, 0.0, std)

    def num_parameters(self) -> int:
        """Parameter count (a tied embedding once)."""
        return sum(p.numel() for p in self.parameters())

    def hidden(self, ids: torch.Tensor, cache: KVCache | SlotKVCache | None = None) -> torch.Tensor:
        """The final normed hidden states [b, t, dim] of ids [b, t] (after the cached tokens: `cache.pos`
        of a `KVCache`, each row's own of a `SlotKVCache`, which takes one token per row)."""
        t = ids.shape[1]
        start = cache.pos if isinstance(cache, KVCache) else 0  # a SlotKVCache checks its own rows
        if start + t > self.cfg.context:
            raise ValueError(f"{start + t} tokens exceed the model's context of {self.cfg.context}")
        cos, sin = (self.cos[:t], self.sin[:t]) if cache is None else cache.rope(self.cos, self.sin, t)
        x = self.embed(ids)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, i)
        if cache is not None:
            cache.advance(t)
        return self.norm(x)

    def last_logits(self, ids: torch.Tensor, cache: KVCache | SlotKVCache | None = None) -> torch.Tensor:
        """The next-token logits [b, vocab] after ids [b, t]: the head on the last position only (reading
        a prompt of t tokens needs one row of logits, not t)."""
        return self.head(self.hidden(ids, cache)[:, -1])

    def forward(
        self,
        ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | SlotKVCache | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        h = self.hidden(ids, cache)
        if targets is None:
            return self.head(h)
        logits = self.head(h).float()
        loss = F.cross_entropy(
            logits.view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="sum"
        )
        return loss, (targets != IGNORE).sum()

    def new_cache(self, batch: int, length: int | None = None, like: torch.Tensor | None = None) -> KVCache:
        """An empty KV cache for `batch` sequences of up to `length` tokens (default: the context)."""
        like = like if like is not None else self.embed.weight
        c = self.cfg
        return KVCache(c.layers, batch, c.key_value_heads, length or c.context, c.dim // c.heads, like)


@torch.inference_mode()  # no autograd bookkeeping at all: ~4% faster per token than no_grad on a CPU
def generate_ids(
    model: GPT,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    stop_id: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token ids [b] one step at a time after prompt [b, t] (streaming).

    With the cache each step runs one token through the model; without it, the whole sequence again
    (for checking the cache, and the benchmark). A prompt longer than the context keeps its end.
    Stops after `max_new_tokens`, at the context's end with the cache, or when every row produced
    `stop_id`.
    """
    model.eval()
    context = model.cfg.context
    ids = prompt[:, -(context - 1) :] if prompt.shape[1] >= context else prompt
    cache = model.new_cache(ids.shape[0]) if use_cache else None
    logits = model.last_logits(ids, cache)
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        yield nxt
        if stop_id is not None:
            done |= nxt == stop_id
            if bool(done.all()):
                return
        if cache is not None:
            if cache.pos >= context:
                return
            logits = model.last_logits(nxt[:, None], cache)
        else:
            ids = torch.cat([ids, nxt[:, None]], dim=1)[:, -context:]
            logits = model.last_logits(ids)


class GPTRows(DecodeRows):
    """Decode many sequences together, each at its own position (continuous batching of served
    generations): `add` reads a prompt into a free row, `step` feeds one token to every live row, and
    `remove` frees a row (the last row moves into it). Rows are kept in `SlotKVCache`; the logits of a
    row are those `generate_ids` computes for the same sequence alone (up to float rounding)."""

    def __init__(self, model: GPT, slots: int):
        self.model = model.eval()
        c = model.cfg
        head_dim, like = c.dim // c.heads, model.embed.weight
        self.cache = SlotKVCache(c.layers, slots, c.key_value_heads, c.context, head_dim, like)
        self.caches, self.limit, self.slots = (self.cache,), c.context, slots

    def add(self, ids: list[int]) -> torch.Tensor:
        """Read a prompt (at most context tokens, at least one) into the next row → its next-token
        logits [vocab]."""
        return self.reader(ids).read()

    def reader(self, ids: list[int]) -> PromptReader:
        """The prompt to read in passes (the server's chunked prefill, so running rows need not wait for
        a long prompt in one go): each `read(n)` runs the next n tokens through a cache of its own; the
        last puts the prompt into the next row and returns its next-token logits [vocab]. The live rows
        are untouched until then (they step between the passes)."""
        if not 0 < len(ids) <= self.model.cfg.context:
            raise ValueError(f"a prompt of 1 to {self.model.cfg.context} tokens (got {len(ids)})")
        device = self.model.embed.weight.device
        cache = self.model.new_cache(1, len(ids))

        @torch.inference_mode()
        def run(tokens: list[int], start: int) -> torch.Tensor:
            return self.model.last_logits(torch.tensor([tokens], dtype=torch.long, device=device), cache)[0]

        @torch.inference_mode()
        def finish() -> None:
            self.cache.put(cache)

        return PromptReader(ids, run, finish)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor | list[int]) -> torch.Tensor:
        """Feed token ids [rows] (one per live row, in row order) → next-token logits [rows, vocab]."""
        return self.model(self.tokens(tokens)[:, None], cache=self.cache)[:, -1]
