"""An encoder-decoder Transformer (translation, summarization, any text → text) in one sitting.

source ids [b, s] → embedding → N × encoder block (bidirectional self-attention over real tokens, SwiGLU)
→ norm = memory [b, s, dim]. target ids [b, t] → the same embedding → M × decoder block (causal
self-attention, cross-attention into the memory, SwiGLU) → norm → logits [b, t, vocab] through the tied
embedding. Pre-norm RMSNorm blocks, RoPE on the self-attentions (cross-attention has no positions to
rotate: it looks up memory by content), `scaled_dot_product_attention` throughout.

Decoding keeps the decoder's keys and values in a `KVCache` and computes every layer's cross-attention
keys and values once per source, so a step costs one token's work. `beam_search` ranks beams by
log-probability / length^penalty; `stream_ids` is greedy or sampled and yields ids as they come.
Init: N(0, 0.02), residual projections 0.02 / sqrt(2·blocks) (GPT-2's rule, over both stacks).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from largo.config_seq2seq import Seq2SeqModelConfig
from largo.data.pair_text import BOS, EOS, NEVER, PAD  # the tokenizer's first ids
from largo.models.beams import Beams, strip_eos
from largo.models.layers import (
    DecodeRows,
    KVCache,
    SelfAttention,
    SlotKVCache,
    SwiGLU,
    rope_tables,
    sample_next,
)


class CrossAttention(nn.Module):
    def __init__(self, cfg: Seq2SeqModelConfig):
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.dim // cfg.heads
        self.q = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.kv = nn.Linear(cfg.dim, 2 * cfg.dim, bias=False)
        self.proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.dropout = cfg.dropout

    def keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The memory's keys and values [b, h, s, d] (computed once per source when decoding)."""
        b, s, _ = memory.shape
        k, v = self.kv(memory).view(b, s, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(
        self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor
    ) -> torch.Tensor:
        b, t, c = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, *kv, attn_mask=mask, dropout_p=drop)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class EncoderBlock(nn.Module):
    def __init__(self, cfg: Seq2SeqModelConfig):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(cfg.dim, eps=1e-5), nn.RMSNorm(cfg.dim, eps=1e-5)
        self.attn = SelfAttention(cfg.dim, cfg.heads, cfg.dropout)
        self.mlp = SwiGLU(cfg.dim, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), cos, sin, mask=mask))
        return x + self.drop(self.mlp(self.norm2(x)))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: Seq2SeqModelConfig):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(cfg.dim, eps=1e-5), nn.RMSNorm(cfg.dim, eps=1e-5)
        self.norm3 = nn.RMSNorm(cfg.dim, eps=1e-5)
        self.attn = SelfAttention(cfg.dim, cfg.heads, cfg.dropout)
        self.cross = CrossAttention(cfg)
        self.mlp = SwiGLU(cfg.dim, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, kv, mask, cache: KVCache | None, i: int) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), cos, sin, causal=True, cache=cache, layer=i))
        x = x + self.drop(self.cross(self.norm2(x), kv, mask))
        return x + self.drop(self.mlp(self.norm3(x)))


class Seq2SeqTransformer(nn.Module):
    """forward({"source", "target"}) → {"nll": summed loss per example [b], "tokens": targets per example}.

    `target` holds BOS, the target's tokens and EOS, right-padded with PAD; each position predicts the
    next. In training the loss is label-smoothed (`label_smoothing`); in eval mode it is the plain
    negative log-likelihood, so validation reports a true perplexity.
    """

    def __init__(self, cfg: Seq2SeqModelConfig, label_smoothing: float = 0.0):
        super().__init__()
        if cfg.vocab_size is None or cfg.context is None:
            raise ValueError("model.vocab_size and model.context: not set (they come from the tokenizer)")
        self.cfg, self.label_smoothing = cfg, label_smoothing
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.encoder = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.encoder_layers))
        self.decoder = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.decoder_layers))
        self.enc_norm, self.dec_norm = nn.RMSNorm(cfg.dim, eps=1e-5), nn.RMSNorm(cfg.dim, eps=1e-5)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.head.weight = self.embed.weight  # tied input and output embeddings
        self.drop = nn.Dropout(cfg.dropout)
        cos, sin = rope_tables(cfg.dim // cfg.heads, cfg.context + 1, cfg.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.own_init = True
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """N(0, 0.02); the projections into the residual stream scaled down by sqrt(2·blocks)."""
        blocks = self.cfg.encoder_layers + self.cfg.decoder_layers
        for name, p in self.named_parameters():
            if p.ndim < 2:
                continue  # norm scales stay 1
            residual = name.endswith(("proj.weight", "w2.weight"))
            nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * blocks) if residual else 0.02)

    def num_parameters(self) -> int:
        """Parameter count (the tied embedding once)."""
        return sum(p.numel() for p in self.parameters())

    def encode(self, source: torch.Tensor) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Source ids [b, s] → every decoder layer's cross-attention keys and values, and the mask
        [b, 1, 1, s] of real source tokens they attend to."""
        s = source.shape[1]
        mask = (source != PAD)[:, None, None, :]
        x = self.drop(self.embed(source))
        for block in self.encoder:
            x = block(x, self.cos[:s], self.sin[:s], mask)
        memory = self.enc_norm(x)
        return [block.cross.keys_values(memory) for block in self.decoder], mask

    def decode(
        self, target: torch.Tensor, kv: list, mask: torch.Tensor, cache: KVCache | SlotKVCache | None = None
    ) -> torch.Tensor:
        """Target ids [b, t] (after the cached ones: `cache.pos` of a `KVCache`, each row's own of a
        `SlotKVCache`, which takes one token per row) → logits [b, t, vocab]."""
        t = target.shape[1]
        start = cache.pos if isinstance(cache, KVCache) else 0
        if start + t > self.cfg.context + 1:
            raise ValueError(f"{start + t} target tokens exceed the model's {self.cfg.context + 1}")
        cos, sin = (self.cos[:t], self.sin[:t]) if cache is None else cache.rope(self.cos, self.sin, t)
        x = self.drop(self.embed(target))
        for i, block in enumerate(self.decoder):
            x = block(x, cos, sin, kv[i], mask, cache, i)
        if cache is not None:
            cache.advance(t)
        return self.head(self.dec_norm(x))

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        kv, mask = self.encode(batch["source"])
        target = batch["target"]
        logits = self.decode(target[:, :-1], kv, mask).float()
        labels = target[:, 1:]
        smoothing = self.label_smoothing if self.training else 0.0
        nll = F.cross_entropy(
            logits.transpose(1, 2), labels, ignore_index=PAD, label_smoothing=smoothing, reduction="none"
        )  # [b, t]
        real = labels != PAD
        correct = (logits.argmax(-1) == labels) & real
        return {"nll": nll.sum(1), "tokens": real.sum(1), "correct": correct.sum(1)}

    def new_cache(self, batch: int, like: torch.Tensor) -> KVCache:
        """An empty decoder KV cache for `batch` sequences of up to the context (+ BOS)."""
        c = self.cfg
        return KVCache(c.decoder_layers, batch, c.heads, c.context + 1, c.dim // c.heads, like)


@torch.inference_mode()
def stream_ids(
    model: Seq2SeqTransformer,
    source: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token ids [b] of the targets of source [b, s], greedy (temperature 0) or sampled;
    stops after `max_new_tokens`, at the context's end, or when every row has produced EOS."""
    model.eval()
    kv, mask = model.encode(source)
    cache = model.new_cache(source.shape[0], kv[0][0])
    step = torch.full((source.shape[0], 1), BOS, dtype=torch.long, device=source.device)
    done = torch.zeros(source.shape[0], dtype=torch.bool, device=source.device)
    for _ in range(min(max_new_tokens, model.cfg.context)):
        logits = model.decode(step, kv, mask, cache)[:, -1]
        logits[:, NEVER] = -math.inf
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        nxt = nxt.masked_fill(done, PAD)
        yield nxt
        done |= nxt == EOS
        if bool(done.all()):
            return
        step = nxt[:, None]


def greedy(model: Seq2SeqTransformer, source: torch.Tensor, max_new_tokens: int) -> list[list[int]]:
    """The greedy target ids of each source row (EOS and padding cut)."""
    steps = list(stream_ids(model, source, max_new_tokens))
    if not steps:
        return [[] for _ in range(source.shape[0])]
    return [strip_eos(row) for row in torch.stack(steps, 1).tolist()]


@torch.inference_mode()
def beam_search(
    model: Seq2SeqTransformer,
    source: torch.Tensor,
    max_new_tokens: int,
    beams: int = 4,
    length_penalty: float = 1.0,
    *,
    early_stopping: bool = True,
    use_cache: bool = True,
) -> list[list[int]]:
    """The best target ids of each source row [b, s] by beam search (EOS cut), ranked, finished and
    stopped as `models.beams` describes (the bookkeeping the ONNX runtime shares); this side computes
    each step's log-probabilities and best candidates on the model's device. Without the cache every
    step runs the whole prefix again (for checking the cache, and the benchmark).
    """
    if beams == 1:
        return greedy(model, source, max_new_tokens)
    model.eval()
    b, k, device = source.shape[0], beams, source.device
    kv, mask = model.encode(source.repeat_interleave(k, 0))  # row i's beams are rows i·k … i·k + k − 1
    cache = model.new_cache(b * k, kv[0][0]) if use_cache else None
    search = Beams(b, k, min(max_new_tokens, model.cfg.context), length_penalty, early_stopping)
    bos = torch.full((b * k, 1), BOS, dtype=torch.long, device=device)
    while not search.over:
        if search.step == 0:
            step_ids = bos
        elif cache is not None:
            step_ids = torch.from_numpy(search.tokens).to(device)[:, None]
        else:
            step_ids = torch.cat([bos, torch.from_numpy(search.seqs).to(device)], 1)
        logits = model.decode(step_ids, kv, mask, cache)[:, -1].float()
        logits[:, NEVER] = -math.inf
        logp = logits.log_softmax(-1)  # [b·k, V]
        scores = torch.from_numpy(search.scores).to(device)
        cand = (scores[..., None] + logp.view(b, k, -1)).view(b, -1)
        top, index = cand.topk(min(2 * k, cand.shape[-1]), dim=-1)  # [b, 2k]
        rows = search.advance(top.cpu().numpy(), index.cpu().numpy(), logp.shape[-1])
        if cache is not None and not search.over:
            cache.reorder(torch.from_numpy(rows).to(device))
    return search.best()


class Seq2SeqRows(DecodeRows):
    """Decode the targets of many sources together, each at its own position (continuous batching of
    served generations), as `GPTRows` does for a GPT: `add` encodes a source into a free row and returns
    the logits of its first target token, `step` feeds one token to every live row, `remove` frees a row.

    Each row keeps its decoder keys and values in one `SlotKVCache` and its source's cross-attention keys
    and values in another (of up to `source_length` tokens), masked to its own source. PAD and BOS get
    -inf logits, as in `stream_ids`.
    """

    def __init__(self, model: Seq2SeqTransformer, slots: int, source_length: int):
        self.model = model.eval()
        c, like = model.cfg, model.embed.weight
        head_dim = c.dim // c.heads
        self.cache = SlotKVCache(c.decoder_layers, slots, c.heads, c.context + 1, head_dim, like)
        self.memory = SlotKVCache(c.decoder_layers, slots, c.heads, source_length, head_dim, like)
        self.caches, self.limit, self.slots = (self.cache, self.memory), c.context, slots  # limit: target

    @torch.inference_mode()
    def add(self, ids: list[int]) -> torch.Tensor:
        """Encode a source (1 to source_length ids, EOS last) into the next row → the logits [vocab] of
        its target's first token."""
        if not 0 < len(ids) <= self.memory.length:
            raise ValueError(f"a source of 1 to {self.memory.length} tokens (got {len(ids)})")
        source = torch.tensor([ids], dtype=torch.long, device=self.model.embed.weight.device)
        kv, mask = self.model.encode(source)
        like = kv[0][0]
        memory = KVCache(0, 1, self.model.cfg.heads, len(ids), like.shape[-1], like)
        memory.k, memory.v, memory.pos = [k for k, _ in kv], [v for _, v in kv], len(ids)
        cache = self.model.new_cache(1, like)
        bos = torch.full((1, 1), BOS, dtype=torch.long, device=source.device)
        logits = self.model.decode(bos, kv, mask, cache)[0, -1]
        self.memory.put(memory)
        try:
            self.cache.put(cache)
        except BaseException:  # the two caches keep the same rows: undo the first
            self.memory.remove(self.memory.rows - 1)
            raise
        logits[NEVER] = -math.inf
        return logits

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor | list[int]) -> torch.Tensor:
        """Feed token ids [rows] (one per live row, in row order) → next-token logits [rows, vocab]."""
        tokens = self.tokens(tokens)
        n, end = self.rows, max(self.memory.lengths)
        kv = [(k[:n, :, :end], v[:n, :, :end]) for k, v in zip(self.memory.k, self.memory.v, strict=True)]
        keys = torch.arange(end, device=tokens.device)
        mask = (keys[None, :] < self.memory.positions[:, None])[:, None, None, :]
        logits = self.model.decode(tokens[:, None], kv, mask, self.cache)[:, -1]
        logits[:, NEVER] = -math.inf
        return logits
