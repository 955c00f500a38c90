"""The only pieces model families share: activations, an MLP stack, weight init, masked pooling, and the
Transformer parts of the GPT and the encoder-decoder (RoPE, SwiGLU)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def mlp_stack(
    in_dim: int, hidden: list[int], activation: str = "relu", dropout: float = 0.0, norm: str = "none"
) -> nn.Sequential:
    """Linear → [norm] → activation → dropout, once per hidden width. Output width = hidden[-1]."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers.append(nn.Linear(in_dim, width))
        if norm == "batch":
            layers.append(nn.BatchNorm1d(width))
        elif norm == "layer":
            layers.append(nn.LayerNorm(width))
        layers.append(ACTIVATIONS[activation]())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        in_dim = width
    return nn.Sequential(*layers)


TOKEN_EMBEDDING_STD = 0.02


def token_embedding(vocab_size: int, dim: int) -> nn.Embedding:
    """A token table initialized small, N(0, 0.02), as Keras (U(±0.05)) and fastText (U(±1/dim)) do.

    PyTorch's N(0, 1) makes pooled features of a fresh model mostly noise that Adam's ~lr-sized steps
    take epochs to overcome: a bag of words at N(0, 1) sat at chance for 3 epochs on a 10k-review task
    and peaked late and lower; small tables learn from the first epoch. Used by the bag encoder. The
    TextCNN and the RNN keep N(0, 1): with inputs this small, a conv filter whose (PyTorch-initialized)
    bias is negative never fires, so ReLU leaves it dead from the start.
    """
    embed = nn.Embedding(vocab_size, dim)
    nn.init.normal_(embed.weight, 0.0, TOKEN_EMBEDDING_STD)
    return embed


def init_weights(module: nn.Module, scheme: str, std: float = 0.02, activation: str = "relu") -> None:
    """Re-initialize Linear, Conv and Embedding weights in place ('default' keeps PyTorch's init).

    normal: N(0, std); xavier: Glorot uniform; he: Kaiming normal (fan_in) for the activation.
    Biases are zeroed; norm layers keep weight 1, bias 0.
    """
    if scheme == "default":
        return
    gain_name = "relu" if activation in ("relu", "gelu", "silu") else "tanh"
    for m in module.modules():
        if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d):
            if scheme == "normal":
                nn.init.normal_(m.weight, 0.0, std)
            elif scheme == "xavier":
                nn.init.xavier_uniform_(m.weight, gain=nn.init.calculate_gain(gain_name))
            elif scheme == "he":
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity=gain_name)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std if scheme == "normal" else 1.0 / math.sqrt(m.embedding_dim))


class PixelNorm(nn.Module):
    """Raw pixels (uint8 or float, 0..255) → standardized floats with train-split mean/std buffers."""

    def __init__(self, channels: int, mean: list[float] | None = None, std: list[float] | None = None):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean or [0.5] * channels).view(1, channels, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std or [0.25] * channels).view(1, channels, 1, 1) * 255.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x [b, t, c] over the time steps where mask [b, t] is True → [b, c].

    A row with no True step gives zeros (not NaN), so an empty text still has a finite vector.
    """
    m = mask.unsqueeze(-1)  # [b, t, 1]
    count = m.sum(1).clamp(min=1).to(x.dtype)  # [b, 1]
    return x.masked_fill(~m, 0.0).sum(1) / count


def masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Maximum of x [b, t, c] over the time steps where mask [b, t] is True → [b, c].

    A row with no True step gives zeros. The dtype's lowest finite value stands in for -inf, so no
    inf ever appears (fp16 and exported graphs stay finite).
    """
    m = mask.unsqueeze(-1)  # [b, t, 1]
    lowest = torch.finfo(x.dtype).min
    out = x.masked_fill(~m, lowest).amax(1)  # [b, c]
    return torch.where(m.any(1), out, torch.zeros_like(out))


def masked_pool(x: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool x [b, t, c] over valid steps: 'mean' or 'max' → [b, c]; 'mean_max' → both side by side [b, 2c]."""
    if pooling == "mean":
        return masked_mean(x, mask)
    if pooling == "max":
        return masked_max(x, mask)
    if pooling == "mean_max":
        return torch.cat([masked_mean(x, mask), masked_max(x, mask)], dim=-1)
    raise ValueError(f"unknown pooling {pooling!r}; allowed: mean, max, mean_max")


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of RoPE's rotation angles → two [length, head_dim / 2] tables."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (first half, second half) of x [b, h, t, d] by the angles of its positions."""
    x1, x2 = x.float().chunk(2, dim=-1)  # [b, h, t, d/2] each
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return out.type_as(x)


class SwiGLU(nn.Module):
    """The gated MLP of LLaMA-style blocks: w2(silu(w1 x) · w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)  # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, dim, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class KVCache:
    """Keys and values of every layer for the positions seen so far, preallocated to `length`."""

    def __init__(self, layers: int, batch: int, heads: int, length: int, head_dim: int, like: torch.Tensor):
        shape = (batch, heads, length, head_dim)
        self.k = [torch.zeros(shape, dtype=like.dtype, device=like.device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=like.dtype, device=like.device) for _ in range(layers)]
        self.length = length
        self.pos = 0  # positions filled

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [b, h, t_new, d] at the next positions; return all keys and values so far."""
        t = k.shape[2]
        self.k[layer][:, :, self.pos : self.pos + t] = k
        self.v[layer][:, :, self.pos : self.pos + t] = v
        end = self.pos + t
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the cached rows at `index` [b'] (beam search: the beams that survive a step)."""
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids [b] from last-position logits [b, vocab]: greedy at temperature 0, else sampled
    from the temperature-scaled distribution cut to the top k tokens and to the top-p probability mass."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # the mass before a token already reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
        logits = torch.full_like(logits, -math.inf).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class SelfAttention(nn.Module):
    """Multi-head self-attention with RoPE (`scaled_dot_product_attention`): bidirectional under a
    boolean `mask` of the keys each query may see, or causal; with a `KVCache` it attends over the
    cached positions too (GPT generation, the seq2seq decoder)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.dropout = dropout

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        b, t, c = x.shape  # batch, time, channels
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [b, h, t, d]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        start = 0
        if cache is not None:
            start = cache.pos
            k, v = cache.update(layer, k, v)
        if causal and start > 0:  # after a cached prefix the causal flag would align queries wrongly:
            if t > 1:  # a chunk: query i sees keys up to start + i (one new token sees them all)
                rows = torch.arange(start, start + t, device=x.device)[:, None]
                mask = torch.arange(k.shape[2], device=x.device)[None, :] <= rows
            causal = False
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, is_causal=causal)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))
