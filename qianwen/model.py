"""The Qwen transformer (QWEN_SPEC.md sections 1 and 2).

A pre-norm decoder: RMSNorm, rotary attention with a fused QKV projection
(with bias), SwiGLU MLP, untied output head. Long-context inference adds
dynamic NTK, LogN query scaling and per-layer windows; all three switch off
while the module is in training mode. The model knows nothing of training,
distribution or checkpoint formats.
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from qianwen.config import ModelConfig

CPU_BF16_ATTENTION_MIN_KEYS = 192  # below this many keys a CPU attends faster in fp32 than in bf16

# ---------------------------------------------------------------------------
# Long-context formulas (section 2)


def ntk_alpha(length: int, seq_length: int) -> float:
    """Dynamic NTK factor for a prompt of `length` tokens: 1, 3, 7, 15 at 1x..8x."""
    context_value = math.log2(length / seq_length) + 1
    return max(2 ** math.ceil(context_value) - 1, 1)


def ntk_base(base: float, alpha: float, rotary_dim: int) -> float:
    return base * alpha ** (rotary_dim / (rotary_dim - 2))


def inverse_frequencies(base: float, rotary_dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))


def logn_factors(positions: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Query multiplier for 0-based positions: log(i)/log(seq_length) past training length."""
    i = positions.double() + 1
    scaled = torch.log(i) / math.log(seq_length)
    return torch.where(i > seq_length, scaled, torch.ones_like(i)).float()


# ---------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Normalise in fp32, cast back, then scale: the order Qwen's reference uses.
        return F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype) * self.weight


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split ("NeoX") rotation of the last dim, computed in fp32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        qkv_dim = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.qkv = nn.Linear(config.hidden_size, qkv_dim, bias=config.qkv_bias)
        self.proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.dropout = config.dropout

    def forward(
        self,
        x: torch.Tensor,
        ctx: _Context,
        layer: int,
        cache: KVCache | None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, K, D = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv(x).view(B, T, H + 2 * K, D)
        cos, sin, logn = ctx.rotary(layer)
        qk = apply_rotary(qkv[:, :, : H + K], cos, sin)
        q, k, v = qk[:, :, :H], qk[:, :, H:], qkv[:, :, H + K :]
        if logn is not None:
            q = q * logn.to(q.dtype)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.write(layer, ctx.start, k, v)
        mask = ctx.mask(layer)
        dtype = q.dtype
        # PyTorch's CPU attention runs slower in bf16 than in fp32 below about 192 keys (forward and backward
        # at 80: 4.3 against 1.5 ms for 8 rows of 4 heads), where PPO's and SFT's short sequences are: there it
        # computes in fp32, outside autocast. One query per row (a decoding step) is the exception: bf16 reads
        # half the cache and runs 2.2x faster at 100 keys, 16 rows.
        fp32 = (
            q.device.type == "cpu" and dtype == torch.bfloat16 and T > 1 and k.shape[-2] < CPU_BF16_ATTENTION_MIN_KEYS
        )
        with torch.autocast("cpu", enabled=False) if fp32 else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(
                q.float() if fp32 else q,
                k.float() if fp32 else k,
                v.float() if fp32 else v,
                attn_mask=mask,
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=mask is None and ctx.causal,
                enable_gqa=K != H,
            )
        return self.proj(out.to(dtype).transpose(1, 2).reshape(B, T, H * D))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one matmul."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config)
        self.dropout = config.dropout

    def forward(self, x, ctx, layer, cache):
        h = x + F.dropout(self.attn(self.attn_norm(x), ctx, layer, cache), self.dropout, self.training)
        return h + F.dropout(self.mlp(self.mlp_norm(h)), self.dropout, self.training)


# ---------------------------------------------------------------------------
# KV cache and the per-forward context (positions, rotary tables, masks)


def branch_mask(segments: torch.Tensor) -> torch.Tensor:
    """The [B, T, T] attention mask of rows that each hold a trunk and its branches (a prompt and its replies):
    `segments` [B, T] is 0 on the trunk, b > 0 on branch b and -1 on padding. A token sees the trunk's tokens
    and its own branch's up to itself; padding sees only itself, so no row of the mask is empty."""
    q, k = segments[:, :, None], segments[:, None, :]
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    eye = torch.eye(T, dtype=torch.bool, device=segments.device)
    return causal & ((k == 0) | (k == q)) & (q >= 0) | ((q < 0) & eye)


class KVCache:
    """Pre-allocated keys and values for every layer, in slot order.

    Rows may be left-padded: `valid` marks real tokens, and positions count only
    real tokens, so a padded row decodes exactly as it would alone. The NTK
    factor of each row is fixed when the cache is first filled (prefill)."""

    def __init__(self, config: ModelConfig, batch: int, max_len: int, device=None, dtype=None):
        shape = (config.num_layers, batch, config.num_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0  # slots filled
        self.valid: torch.Tensor | None = None  # [B, max_len] bool, only once padding is seen
        self.seen = torch.zeros(batch, dtype=torch.long, device=device)  # real tokens per row
        self.alpha: torch.Tensor | None = None  # [B] NTK factor fixed at prefill

    def advance(self) -> None:
        """Account for one token per row written by `Transformer.decode_step`."""
        self.length += 1
        self.seen = self.seen + 1

    def rows(self, start: int, stop: int, max_len: int | None = None) -> KVCache:
        """Rows start:stop and their first `max_len` slots as a cache that shares this one's memory. The
        serving engine prefills a new request into one row and decodes its live rows through such a view."""
        view = object.__new__(KVCache)
        view.max_len = max_len or self.max_len
        view.k = self.k[:, start:stop, :, : view.max_len]
        view.v = self.v[:, start:stop, :, : view.max_len]
        view.length, view.valid = 0, None
        view.seen = self.seen[start:stop]
        view.alpha = self.alpha[start:stop] if self.alpha is not None else None
        return view

    def select(self, index: torch.Tensor) -> KVCache:
        """A cache whose row i is a copy of this one's row index[i]: one prefix's keys and values for several
        continuations (lm-eval's options), or the rows still decoding once others have stopped."""
        out = copy.copy(self)
        out.k, out.v = self.k.index_select(1, index), self.v.index_select(1, index)
        out.seen = self.seen.index_select(0, index)
        out.valid = self.valid.index_select(0, index) if self.valid is not None else None
        out.alpha = self.alpha.index_select(0, index) if self.alpha is not None else None
        return out

    def write(self, layer: int, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        if isinstance(start, torch.Tensor):  # one decoding step: write in place (each row at its own slot)
            # Indexed assignment, not scatter_: on a view of the serving engine's cache, scatter_ in bf16 copies the
            # whole layer (200 against 20 us a write at 16 rows).
            rows = torch.arange(k.shape[0], device=k.device)
            slots = start.view(-1).expand(k.shape[0])
            self.k[layer][rows, :, slots] = k[:, :, 0]
            self.v[layer][rows, :, slots] = v[:, :, 0]
            return self.k[layer], self.v[layer]
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class _Spans:
    """Rotary tables and LogN factors per layer. Dynamic NTK and LogN exist for distances and key counts beyond
    the training length; a layer whose window is shorter than the text never attends over more than its window,
    so it gets the NTK factor and LogN factors of that span (factors never decrease with length, so capping them
    at the window's own is the same thing). Windows of at most seq_length thus keep the trained rotary base and no
    LogN; a longer window (the report's upper layers) gets both, sized to it. Built once per distinct window."""

    windows: list[int] | None

    def _init_rotary(self, model, positions, start, end, alpha, logn) -> None:
        self._model, self._positions, self._range = model, positions, (start, end)
        self._alpha, self._logn = alpha, logn
        self._rotary: dict[int | None, tuple] = {}

    def rotary(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(cos, sin, LogN factors or None) for one layer."""
        window = self.windows[layer] if self.windows is not None else None
        if window not in self._rotary:
            alpha, logn, seq_length = self._alpha, self._logn, self._model.config.seq_length
            if window is not None and alpha is not None:
                cap = ntk_alpha(window, seq_length)
                alpha = None if cap == 1 else alpha.clamp(max=cap)
            if window is not None and logn is not None:
                # the factor of a query that attends `window` keys, in plain Python so a compiled step has no .item()
                cap = math.log(window) / math.log(seq_length) if window > seq_length else 1.0
                logn = None if cap == 1 else logn.clamp(max=cap)
            cos, sin = self._model.rotary_tables(self._positions, *self._range, alpha)
            self._rotary[window] = cos, sin, logn
        return self._rotary[window]


class _Context(_Spans):
    """What every layer of one forward pass shares: positions, rotary tables,
    LogN factors and attention masks (built once per distinct window)."""

    def __init__(self, model: Transformer, input_ids, attention_mask, cache):
        config, device = model.config, input_ids.device
        B, T = input_ids.shape
        self.start = start = cache.length if cache is not None else 0
        self.S = end = start + T
        if cache is not None and end > cache.max_len:
            raise ValueError(f"the KV cache holds {cache.max_len} tokens but this step needs {end}.")
        inference = not model.training

        # A [B, T, T] mask lays out a tree of sequences that share prefixes (a prompt and its replies) in one row:
        # each token sees exactly its ancestors, so its position is their count.
        self.tree = None
        if attention_mask is not None and attention_mask.dim() == 3:
            if cache is not None:
                raise ValueError("a [batch, T, T] attention mask is for a forward pass without a KV cache.")
            self.tree = attention_mask.to(device=device, dtype=torch.bool)
            attention_mask = None
        new_valid = None
        if attention_mask is not None:
            new_valid = attention_mask.to(device=device, dtype=torch.bool)
            if bool(new_valid.all()):
                new_valid = None
        padded = new_valid is not None or (cache is not None and cache.valid is not None)

        # Key-slot validity. Positions count real tokens only, so a left-padded
        # row sees the same positions it would see alone.
        self.valid = new_valid
        if cache is not None and padded:
            if cache.valid is None:
                cache.valid = torch.ones(B, cache.max_len, dtype=torch.bool, device=device)
            cache.valid[:, start:end] = True if new_valid is None else new_valid
            self.valid = cache.valid[:, :end]
        positions = None  # None: position == slot for every row
        seen = cache.seen if cache is not None else 0
        if padded:
            steps = new_valid.long().cumsum(1) - 1 if new_valid is not None else torch.arange(T, device=device)
            positions = (seen[:, None] + steps).clamp(min=0) if cache is not None else steps.clamp(min=0)
        if self.tree is not None:
            positions = self.tree.long().sum(-1) - 1
        if cache is not None or (inference and config.use_dynamic_ntk):
            counts = new_valid.long().sum(1) if new_valid is not None else torch.full((B,), T, device=device)
            if self.tree is not None:  # the branches share their prefix's keys, so they share the longest's base
                counts = positions.max(1).values + 1
            total = seen + counts

        # Dynamic NTK: alpha from each row's true length at prefill, then kept.
        alpha = None
        if inference and config.use_dynamic_ntk:
            if cache is not None and start > 0:
                alpha = cache.alpha
            else:
                alpha = torch.tensor([ntk_alpha(n, config.seq_length) for n in total.tolist()], device=device)
                if cache is not None:
                    cache.alpha = alpha
            if alpha is not None and bool((alpha == 1).all()):
                alpha = None
        if cache is not None:
            cache.seen, cache.length = total, end

        logn = None
        if inference and config.use_logn_attn and end > config.seq_length:
            pos = positions if positions is not None else torch.arange(start, end, device=device)[None]
            logn = logn_factors(pos, config.seq_length)[:, :, None, None]  # [B, T, heads, dim]
        self._init_rotary(model, positions, start, end, alpha, logn)

        self.windows = config.attention_windows if inference and config.attention_windows else None
        self.T = T
        self.causal = T > 1
        self._masks: dict[int | None, torch.Tensor | None] = {}
        self._device = device

    def mask(self, layer: int) -> torch.Tensor | None:
        window = self.windows[layer] if self.windows is not None else None
        if window is not None and window >= self.S:
            window = None  # the whole sequence fits: plain causal attention
        if window not in self._masks:
            self._masks[window] = self._build_mask(window)
        return self._masks[window]

    def _build_mask(self, window: int | None) -> torch.Tensor | None:
        if self.tree is not None:
            allowed = self.tree
            if window is not None:
                pos = self._positions
                allowed = allowed & (pos[:, :, None] - pos[:, None, :] < window)
            return allowed[:, None]
        needs_offset = self.T > 1 and self.start > 0
        if self.valid is None and window is None and not needs_offset:
            return None  # SDPA's own causal path (or no mask at all for one query)
        q = torch.arange(self.start, self.S, device=self._device)[:, None]
        k = torch.arange(self.S, device=self._device)[None, :]
        allowed = k <= q
        if window is not None:
            allowed = allowed & (k > q - window)
        if self.valid is not None:
            # Padding is never attended to, except by itself, so no row is all -inf.
            allowed = allowed[None] & (self.valid[:, None, :] | (k == q)[None])
            return allowed[:, None]
        return allowed[None, None]


class _StepContext(_Spans):
    """One new token per row with shapes that never change between steps:
    attention spans every cache slot under a mask, and the slot is a tensor,
    so one compiled (or CUDA-graph captured) step serves every position."""

    causal = False

    def __init__(self, model: Transformer, cache: KVCache, slot: torch.Tensor):
        config, inference = model.config, not model.training
        self.start = slot
        positions = cache.seen[:, None]
        alpha = cache.alpha if inference and config.use_dynamic_ntk else None
        logn = None
        if inference and config.use_logn_attn:
            logn = logn_factors(positions, config.seq_length)[:, :, None, None]
        self._init_rotary(model, positions, 0, 0, alpha, logn)
        keys = torch.arange(cache.max_len, device=slot.device)
        slot = slot.view(-1, 1)  # one slot for every row, or one per row
        allowed = keys[None, :] <= slot
        if cache.valid is not None:
            cache.valid.scatter_(1, slot.expand(cache.valid.shape[0], 1), True)
            allowed = allowed & cache.valid
        self._keys, self._slot, self._allowed = keys, slot, allowed
        self.windows = config.attention_windows if inference and config.attention_windows else None
        self._masks: dict[int | None, torch.Tensor] = {}

    def mask(self, layer: int) -> torch.Tensor:
        window = self.windows[layer] if self.windows is not None else None
        if window not in self._masks:
            allowed = self._allowed if window is None else self._allowed & (self._keys > self._slot - window)
            self._masks[window] = allowed[:, None, None, :]
        return self._masks[window]


# ---------------------------------------------------------------------------
# The model


class Embedding(nn.Embedding):
    """nn.Embedding without its default initialisation on the meta device, where checkpoints are loaded into:
    torch's meta `normal_` imports torch._dynamo, 1.9 s of every process that loads a model."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self._rope_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def init_weights(self, seed: int | None = None) -> None:
        """normal(0, 0.02); output projections scaled by 1/sqrt(2 * layers)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                scale = (
                    1 / math.sqrt(2 * self.config.num_layers) if name.endswith(("proj.weight", "down.weight")) else 1
                )
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std * scale)

    def rotary_tables(self, positions: torch.Tensor | None, start: int, end: int, alpha):
        """cos and sin [B, T, 1, head_dim/2] in fp32, for positions [B, T] or,
        when positions is None, for the range start..end shared by all rows.
        With NTK factors alpha [B], each row gets its own rotary base."""
        D = self.config.head_dim
        device = self.embed.weight.device
        if positions is None:
            positions = torch.arange(start, end, device=device)[None]
        if alpha is not None:
            # the base in float64 then rounded, as a Python-float base would be
            base = (self.config.rope_base * alpha.double() ** (D / (D - 2))).float()
            exponents = torch.arange(0, D, 2, dtype=torch.float32, device=device) / D
            inv = 1.0 / base[:, None] ** exponents
            freqs = positions.float()[..., None] * inv[:, None, :]
            return freqs.cos()[:, :, None], freqs.sin()[:, :, None]
        cos, sin = self._rope_table(end if end else self.config.max_position_embeddings)
        return cos[positions][:, :, None], sin[positions][:, :, None]

    def _rope_table(self, needed: int) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.embed.weight.device
        table = self._rope_cache
        if table is None or table[0].shape[0] < needed or table[0].device != device:
            size = max(needed, self.config.max_position_embeddings)
            # Built as a normal tensor even during generation, so training may reuse it.
            with torch.inference_mode(False), torch.no_grad():
                inv = inverse_frequencies(self.config.rope_base, self.config.head_dim).to(device)
                freqs = torch.outer(torch.arange(size, device=device).float(), inv)
                table = self._rope_cache = (freqs.cos(), freqs.sin())
        return table

    def hidden_states(self, input_ids, attention_mask=None, cache: KVCache | None = None) -> torch.Tensor:
        """Final-norm hidden states [B, T, hidden] (what the output head reads). `attention_mask` is [B, T]
        (1 for a real token, 0 for padding) or, without a cache, [B, T, T]: which tokens each one sees, for a
        row that holds several sequences sharing a prefix (a prompt and its replies)."""
        ctx = _Context(self, input_ids, attention_mask, cache)
        x = self.embed(input_ids)
        x = F.dropout(x, self.config.dropout, self.training)
        for i, layer in enumerate(self.layers):
            x = layer(x, ctx, i, cache)
        return self.norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Logits [B, T, vocab] (or [B, 1, vocab] with last_only, as decoding needs)."""
        h = self.hidden_states(input_ids, attention_mask, cache)
        if last_only:  # h[:, -1] is a plain matrix; the view h[:, -1:] sends F.linear down a 6x slower batched path
            return self.lm_head(h[:, -1]).unsqueeze(1)
        return self.lm_head(h)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        p = self.embed.weight
        self._rope_table(max_len)  # built now, so decoding steps only read it
        return KVCache(self.config, batch, max_len, device=p.device, dtype=p.dtype)

    def decode_step(self, tokens: torch.Tensor, cache: KVCache, slot: torch.Tensor) -> torch.Tensor:
        """Logits [B, vocab] for one new token per row [B, 1] written at cache
        slot `slot` (a 0-dim tensor, or [B] when rows are at different slots).
        Shapes are the same at every step, so this is what `torch.compile`
        captures; the caller then calls `cache.advance()`."""
        ctx = _StepContext(self, cache, slot)
        x = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, ctx, i, cache)
        return self.lm_head(self.norm(x))[:, -1]
