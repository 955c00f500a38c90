"""The only pieces model families share: activations, an MLP stack, weight init, masked pooling, and the
Transformer parts of the GPT and the encoder-decoder (RoPE, SwiGLU)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from largo.models.prefill import PromptReader

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


def rope_tables(
    head_dim: int, length: int, theta: float, scaling: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of RoPE's rotation angles → two [length, head_dim / 2] tables; `scaling` (a
    `RopeScalingConfig`) stretches the frequencies as the model was trained with."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if scaling is not None:
        inv = scaled_frequencies(inv, scaling)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv)
    return angles.cos(), angles.sin()


def scaled_frequencies(inv: torch.Tensor, scaling: Any) -> torch.Tensor:
    """RoPE's inverse frequencies under `linear` (all divided by factor) or `llama3` scaling: wavelengths
    longer than original_context / low_freq_factor are divided by factor, those shorter than
    original_context / high_freq_factor kept, and those between blended smoothly."""
    if scaling.kind == "linear":
        return inv / scaling.factor
    wavelength = 2 * math.pi / inv
    low = scaling.original_context / scaling.low_freq_factor  # wavelengths beyond: scaled
    high = scaling.original_context / scaling.high_freq_factor  # wavelengths below: kept
    smooth = (scaling.original_context / wavelength - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * inv / scaling.factor + smooth * inv
    return torch.where(wavelength > low, inv / scaling.factor, torch.where(wavelength < high, inv, blended))


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

    def attend(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
        """Store the new keys and values; (all keys, all values, attention mask, causal flag) to attend
        with. After a cached prefix the causal flag would align the queries wrongly: a chunk of t > 1 new
        tokens gets a mask where query i sees keys up to pos + i (one new token sees them all)."""
        start, t = self.pos, k.shape[2]
        k, v = self.update(layer, k, v)
        if causal and start > 0:
            if t > 1:
                rows = torch.arange(start, start + t, device=k.device)[:, None]
                mask = torch.arange(k.shape[2], device=k.device)[None, :] <= rows
            causal = False
        return k, v, mask, causal

    def rope(self, cos: torch.Tensor, sin: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE's tables [t, d/2] for the next t positions."""
        return cos[self.pos : self.pos + t], sin[self.pos : self.pos + t]

    def advance(self, t: int) -> None:
        """The t new positions are filled (after every layer stored them)."""
        self.pos += t

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the cached rows at `index` [b'] (beam search: the beams that survive a step)."""
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]


class SlotKVCache:
    """Keys and values of up to `slots` sequences that each sit at a position of their own: continuous
    batching, where a served generation joins and leaves the running batch at any step.

    Rows 0..rows-1 are live. A new sequence takes the next row (`put` copies its prompt's `KVCache` in);
    a finished one gives its row to the last (`remove`), so a step always works on a dense prefix. A step
    feeds one token per row, each at its own position: RoPE's angles come per row (`rope`), the token is
    stored at the row's own length, and the mask lets a row attend to its own tokens only. Memory grows
    with the most rows used so far (doubling, up to `slots`; it is kept, not given back, so a busy
    server does not reallocate); a row holds up to `length` tokens.
    """

    def __init__(self, layers: int, slots: int, heads: int, length: int, head_dim: int, like: torch.Tensor):
        self.layers, self.slots, self.heads = layers, slots, heads
        self.length, self.head_dim = length, head_dim
        self.dtype, self.device = like.dtype, like.device
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self._allocate(min(slots, 4))
        self.lengths: list[int] = []  # tokens cached per live row
        self._refresh()

    @property
    def rows(self) -> int:
        """Live rows."""
        return len(self.lengths)

    def _allocate(self, rows: int) -> None:
        """Room for `rows` rows, the live ones copied over; the old tensors stay until all of it worked
        (an out-of-memory error here leaves the cache as it was)."""
        shape = (rows, self.heads, self.length, self.head_dim)
        k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
        v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
        for new, old in zip(k + v, self.k + self.v, strict=False):
            new[: old.shape[0]] = old
        self.k, self.v = k, v

    def clear(self) -> None:
        """Drop every live row (the memory stays)."""
        self.lengths = []
        self._refresh()

    def put(self, cache: KVCache) -> int:
        """Copy a one-sequence cache (a prompt's pass) into the next row; return the row."""
        row, n = self.rows, cache.pos
        if row >= self.slots:
            raise RuntimeError(f"every one of the {self.slots} rows is taken")
        if n > self.length:
            raise ValueError(f"{n} cached tokens exceed the rows' length of {self.length}")
        if row >= self.k[0].shape[0]:
            self._allocate(min(self.slots, 2 * self.k[0].shape[0]))
        for dst, src in zip(self.k + self.v, cache.k + cache.v, strict=True):
            dst[row, :, :n] = src[0, :, :n]
        self.lengths.append(n)
        self._refresh()
        return row

    def remove(self, row: int) -> None:
        """Drop a row; the last row moves into its place (the caller mirrors the move)."""
        last = self.rows - 1
        if row != last:
            n = self.lengths[last]
            for t in self.k + self.v:
                t[row, :, :n] = t[last, :, :n]
            self.lengths[row] = n
        self.lengths.pop()
        self._refresh()

    def _refresh(self) -> None:
        """The positions [rows] the next tokens go to, and the mask [rows, 1, 1, end] of what each sees."""
        self.positions = torch.tensor(self.lengths, dtype=torch.long, device=self.device)
        self.end = min(max(self.lengths, default=0) + 1, self.length)
        keys = torch.arange(self.end, device=self.device)
        self.mask = (keys[None, :] <= self.positions[:, None])[:, None, None, :]

    def attend(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
        """Store each row's new key and value [rows, h, 1, d] at its own position; (the live rows' keys,
        values, the per-row mask, no causal flag)."""
        del mask, causal  # one token per row: it sees its row's past and itself
        rows = torch.arange(self.rows, device=k.device)
        self.k[layer][rows, :, self.positions] = k[:, :, 0]
        self.v[layer][rows, :, self.positions] = v[:, :, 0]
        end = self.end
        return self.k[layer][: self.rows, :, :end], self.v[layer][: self.rows, :, :end], self.mask, False

    def rope(self, cos: torch.Tensor, sin: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE's tables [rows, 1, 1, d/2] at each row's own position."""
        if t != 1:
            raise ValueError(f"a batch of rows takes one token per row at a time (got {t})")
        return cos[self.positions][:, None, None], sin[self.positions][:, None, None]

    def advance(self, t: int) -> None:
        """Every live row took one more token."""
        self.lengths = [n + t for n in self.lengths]
        self._refresh()


class DecodeRows:
    """What `GPTRows` and `Seq2SeqRows` share: their rows live in `caches` (`SlotKVCache`s kept row for
    row in step, the first of them the decoder's), and a row is full once it holds `limit` tokens."""

    caches: tuple[SlotKVCache, ...]
    limit: int

    @property
    def rows(self) -> int:
        return self.caches[0].rows

    def full(self, row: int) -> bool:
        """Whether the row holds the most tokens the model reads or writes (it can take no more)."""
        return self.caches[0].lengths[row] >= self.limit

    def add(self, ids: list[int]) -> torch.Tensor:
        raise NotImplementedError

    def reader(self, ids: list[int]) -> PromptReader:
        """`add` as the decode loop reads prompts (`GPTRows.reader` reads one in passes): here a source
        is encoded in one pass, whatever `read` asks for."""
        return PromptReader.at_once(ids, self.add)

    @torch.inference_mode()
    def remove(self, row: int) -> None:
        """Free a row; the last row moves into it (the caller mirrors the move)."""
        for cache in self.caches:
            cache.remove(row)

    def clear(self) -> None:
        """Drop every row (after a failed step)."""
        for cache in self.caches:
            cache.clear()

    def tokens(self, tokens: torch.Tensor | list[int]) -> torch.Tensor:
        """Token ids as a long tensor on the rows' device."""
        return torch.as_tensor(tokens, dtype=torch.long, device=self.caches[0].device)

    def sampler(self, seed: int) -> torch.Generator:
        """A request's own seeded generator of uniform draws, on the rows' device."""
        return torch.Generator(device=self.caches[0].device).manual_seed(seed)

    @torch.inference_mode()
    def next_tokens(
        self,
        logits: torch.Tensor,
        settings: list[tuple[float, int | None, float | None]],
        samplers: list[torch.Generator | None],
    ) -> list[int]:
        """The next token of each row: greedy rows (sampler None) by argmax, the others sampled in one
        `sample_rows` pass with their (temperature, top_k, top_p) and one draw of their generator."""
        tokens = logits.argmax(-1)
        sampled = [i for i, s in enumerate(samplers) if s is not None]
        if sampled:
            rows, device = [settings[i] for i in sampled], logits.device
            tokens[sampled] = sample_rows(
                logits[sampled],
                torch.tensor([t for t, _, _ in rows], device=device),
                torch.tensor([k or 0 for _, k, _ in rows], dtype=torch.long, device=device),
                torch.tensor([1.0 if p is None else p for _, _, p in rows], device=device),
                torch.cat([torch.rand(1, generator=samplers[i], device=device) for i in sampled]),
            )
        return tokens.tolist()


MIN_TEMPERATURE = 1e-4  # the smallest temperature `sample_rows` divides by


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids [b] from last-position logits [b, vocab]: greedy at temperature 0, else sampled
    from the temperature-scaled distribution cut to the top k tokens and to the top-p probability mass
    (one uniform draw of `generator` per row; `sample_rows` with every row's settings the same)."""
    if temperature <= 0:
        return logits.argmax(-1)
    b, device = logits.shape[0], logits.device
    return sample_rows(
        logits,
        torch.full((b,), float(temperature), device=device),
        torch.full((b,), top_k or 0, dtype=torch.long, device=device),
        torch.full((b,), 1.0 if top_p is None else float(top_p), device=device),
        torch.rand(b, generator=generator, device=device),
    )


def sample_rows(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    uniform: torch.Tensor,
) -> torch.Tensor:
    """Next token ids [n] from logits [n, vocab], each row with settings of its own (temperature [n] > 0,
    top_k [n] with 0 for all tokens, top_p [n] with 1 for all the mass) and its own uniform draw [n] in
    [0, 1): one pass for a continuous batch of generations with different requests.

    Inverse-CDF sampling over the tokens ranked by logit: unnormalized weights exp(logit - max) are cut
    to the first top_k and then to the smallest prefix whose mass reaches top_p (a token is dropped when
    the mass before it already does); the token picked is where the cumulative weight passes
    uniform × the kept total. A row's weights and prefix sums do not depend on the other rows, so a row
    draws the same token alone or in any batch.
    """
    vocab = logits.shape[-1]
    k_cap = vocab if bool((top_k <= 0).any()) else min(vocab, int(top_k.max()))
    # a temperature near 0 is greedy: below 1e-4 it is taken as 1e-4, so fp32 logits cannot overflow
    scaled = logits.float() / temperature.clamp(min=MIN_TEMPERATURE)[:, None]
    values, order = torch.topk(scaled, k_cap, dim=-1)  # sorted, likeliest first
    if not bool(torch.isfinite(values[:, 0]).all()):
        raise ValueError("the logits to sample from have no finite largest value (NaN, or every one -inf)")
    rank = torch.arange(k_cap, device=logits.device)
    limit = torch.where(top_k > 0, top_k, vocab)
    weights = (values - values[:, :1]).exp().masked_fill(rank[None, :] >= limit[:, None], 0.0)
    cum = weights.cumsum(-1)
    mass = torch.where(top_p[:, None] < 1.0, top_p[:, None] * cum[:, -1:], math.inf)  # 1: keep every token
    weights = weights.masked_fill(cum - weights >= mass, 0.0)
    cum = weights.cumsum(-1)
    pick = torch.searchsorted(cum, uniform[:, None] * cum[:, -1:]).clamp(max=k_cap - 1)
    return order.gather(1, pick)[:, 0]


class SelfAttention(nn.Module):
    """Multi-head self-attention with RoPE (`scaled_dot_product_attention`): bidirectional under a
    boolean `mask` of the keys each query may see, or causal; with a `KVCache` it attends over the
    cached positions too (GPT generation, the seq2seq decoder)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        dropout: float = 0.0,
        kv_heads: int | None = None,
        qkv_bias: bool = False,
        proj_bias: bool = False,
    ):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.kv_heads = kv_heads or heads  # fewer: grouped-query attention, heads/kv_heads queries per key
        self.qkv = nn.Linear(dim, dim + 2 * self.kv_heads * self.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.dropout = dropout

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        cache: KVCache | SlotKVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        b, t, c = x.shape  # batch, time, channels
        h, kvh, d = self.heads, self.kv_heads, self.head_dim
        if kvh == h:
            q, k, v = self.qkv(x).view(b, t, 3, h, d).permute(2, 0, 3, 1, 4)  # [b, h, t, d]
        else:  # [b, h, t, d] queries, [b, kvh, t, d] keys and values
            q, k, v = (
                part.view(b, t, -1, d).transpose(1, 2)
                for part in self.qkv(x).split([c, kvh * d, kvh * d], -1)
            )
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None and hasattr(cache, "attention"):  # the ONNX export's: past read, not copied
            y = cache.attention(layer, q, k, v)
        else:
            if cache is not None:
                k, v, mask, causal = cache.attend(layer, k, v, mask, causal)
            if kvh != h:  # each key/value head serves heads/kvh query heads in a row
                k, v = k.repeat_interleave(h // kvh, 1), v.repeat_interleave(h // kvh, 1)
            drop = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop, is_causal=causal)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))
