"""The GPT module: a nanoGPT-style decoder with an optional preallocated KV cache for generation."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import GPTConfig


class KVCache(nn.Module):
    """Keys and values of past positions, preallocated (rows, heads, positions, head_dim): the one place that knows the
    cache's layout. Only its methods write it: a decode step's update, a fresh window's fill, a row move, a snapshot."""

    def __init__(self, batch_size: int, n_head: int, max_len: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        shape = (batch_size, n_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a decode step's k, v (b, H, T, D) at input_pos in the first b rows and return those rows of the cache.

        input_pos is (T,), the positions of every row, or (b, T), each row's own (rows of different requests decoded
        together). No shape depends on the positions' values, so a decode step can be traced once and replayed. Shape and
        dtype checks are Python, not tensor ops, so a traced step records only the two copies (it runs on every token).
        """
        b = k.shape[0]
        keys, values = (self.k, self.v) if b == self.k.shape[0] else (self.k[:b], self.v[:b])
        for cache, new in ((keys, k), (values, v)):
            if new.dtype != cache.dtype:
                new = new.to(cache.dtype)
            if input_pos.dim() == 2:
                cache.scatter_(2, input_pos[:, None, :, None].expand_as(new), new)
            else:
                cache.index_copy_(2, input_pos, new)
        return keys, values

    def fill(self, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a fresh window's k, v (b = 1 or len(rows), H, T, D) at positions 0..T-1 of the given rows: a prompt (one
        row, shared by all of a request's sequences) or a slid window; return the first b of those rows, whole. rows is
        a tensor, so a traced slide serves any rows."""
        n, b, length = rows.shape[0], k.shape[0], k.shape[2]
        for cache, new in ((self.k, k), (self.v, v)):
            if new.dtype != cache.dtype:
                new = new.to(cache.dtype)
            cache[:, :, :length].index_copy_(0, rows, new.expand(n, -1, -1, -1))
        mine = rows[:b]
        return self.k.index_select(0, mine), self.v.index_select(0, mine)

    def move_rows(self, src: int, dst: int, n: int) -> None:
        """Copy rows src..src+n-1 to dst..dst+n-1 (a request's rows moved to the front when others end)."""
        for cache in (self.k, self.v):
            cache[dst:dst + n] = cache[src:src + n].clone()

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of the keys and values, for restore()."""
        return self.k.clone(), self.v.clone()

    def restore(self, state: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Put back what snapshot() returned (a trace is made by running the forward, which writes the cache)."""
        self.k.copy_(state[0])
        self.v.copy_(state[1])


def rotary_tables(length: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin (length, head_dim) of rotary embeddings, halves laid out as GPT-NeoX and Llama lay them out;
    the first half of the sin table is negated, as apply_rotary uses it."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    sin = angles.sin()
    sin[:, :head_dim // 2].neg_()
    return angles.cos(), sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., T, D) by the position angles (T, D) of rotary_tables: each pair (i, i + D/2) turns as one
    complex number, x * cos + (-x2, x1) * sin, written as a roll by D/2 times the signed sin (one operator, not four)."""
    if cos.dtype != x.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + x.roll(cos.shape[-1] // 2, -1) * sin


def dropout(layer: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    """layer(x) while training; x itself otherwise, so that a traced decode step records no dropout operator."""
    return layer(x) if layer.training and layer.p > 0 else x


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.qk_norm = config.qk_norm
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # fused q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None, fill_rows: torch.Tensor | None = None) -> torch.Tensor:
        # Shapes from constants, not x.shape, and q and k normed and rotated as one tensor: a traced decode step
        # replays every operator here on every token, so fewer operators is faster generation.
        qkv = self.c_attn(x).unflatten(-1, (3, self.n_head, self.head_dim)).permute(2, 0, 3, 1, 4)  # (3, B, H, T, D)
        qk, v = qkv[:2], qkv[2]
        if self.qk_norm:
            qk = F.rms_norm(qk, (self.head_dim,))
        if rope is not None:
            qk = apply_rotary(qk, *rope)
        q, k = qk.unbind(0)
        if self.kv_cache is not None and (input_pos is not None or fill_rows is not None):
            # over the cache: a decode step (input_pos), or a fresh window (fill_rows) attending over its rows, masked
            k, v = self.kv_cache.update(input_pos, k, v) if fill_rows is None else self.kv_cache.fill(fill_rows, k, v)
            if k.dtype != q.dtype:
                k, v = k.to(q.dtype), v.to(q.dtype)
            if mask.shape[0] > 1:  # rows at their own positions (requests decoded together, 6 to 48 rows): plain
                # matrix products beat SDPA's CPU kernel there, a 24- or 48-row step 1.18x; at 3 rows SDPA is 1.09x
                y = torch.softmax(q @ k.transpose(-1, -2) * self.head_dim ** -0.5 + mask, dim=-1) @ v
            else:
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
            )
        return dropout(self.resid_dropout, self.c_proj(y.transpose(1, 2).flatten(2)))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.relu2 = config.mlp == "relu2"
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        h = F.relu(h).square() if self.relu2 else self.gelu(h)
        return dropout(self.dropout, self.c_proj(h))


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None, fill_rows: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), input_pos, mask, rope, fill_rows)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, init_weights: bool = True):
        """init_weights=False skips GPT-2's initialisation, for a model whose weights are loaded next."""
        super().__init__()
        config.validate()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        if not config.rotary:
            self.transformer["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied input and output embeddings
        if init_weights:
            self.apply(self._init_weights)
            # GPT-2's scaled init of the residual projections.
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        # Additive causal mask over the KV cache, made by setup_caches; a buffer, so .to() moves it with the caches.
        self.register_buffer("causal_mask", None, persistent=False)
        if config.rotary:  # not saved: rebuilt from the config
            cos, sin = rotary_tables(config.block_size, config.n_embd // config.n_head)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (tied weights once); without position embeddings by default, as nanoGPT."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def setup_caches(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> None:
        """Preallocate a KV cache in every layer for batch_size sequences of up to max_len tokens.

        Caches that already hold at least batch_size rows of that length and dtype are kept as they are (as in
        gpt-fast): a request needs no new allocation, and whatever holds them stays valid. They are ordinary tensors
        even when made in inference mode, so the model still works outside it afterwards.
        """
        max_len = min(max_len or self.config.block_size, self.config.block_size)
        weights = self.transformer.ln_f.weight
        dtype = dtype or weights.dtype
        cache = self.transformer.h[0].attn.kv_cache
        if (cache is not None and cache.k.shape[0] >= batch_size and cache.k.shape[2] == max_len
                and cache.k.dtype == dtype and cache.k.device == weights.device):
            return
        hd = self.config.n_embd // self.config.n_head
        with torch.inference_mode(False):
            for block in self.transformer.h:
                block.attn.kv_cache = KVCache(batch_size, self.config.n_head, max_len, hd, dtype).to(weights.device)
            # Additive (0 or -inf) rather than boolean, which SDPA would convert on every call; in the weights'
            # dtype, which the queries have.
            causal = torch.ones(max_len, max_len, dtype=torch.bool, device=weights.device).tril()
            self.causal_mask = torch.zeros(max_len, max_len, dtype=weights.dtype, device=weights.device).masked_fill(
                ~causal, float("-inf"))

    def clear_caches(self) -> None:
        """Drop the KV caches and the mask."""
        for block in self.transformer.h:
            block.attn.kv_cache = None
        self.causal_mask = None

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                input_pos: torch.Tensor | None = None, last_only: bool = False, fill_rows: torch.Tensor | None = None):
        """Logits (B, T, vocab) and, given targets, the mean cross-entropy loss.

        With input_pos (positions of idx's tokens) and caches set up, attends over the KV cache (a decode step); with
        fill_rows instead, runs idx from position 0 and stores its keys and values in those cache rows (a prompt or a
        slid window); last_only returns logits of the final position only (what generation needs).
        """
        B, T = idx.shape
        if fill_rows is not None:  # a fresh window from position 0, attending over the cache rows it fills
            if self.causal_mask is None:
                raise RuntimeError("Call setup_caches() before passing fill_rows.")
            pos = torch.arange(T, device=idx.device)
            mask = self.causal_mask[pos][None, None]
        elif input_pos is None:
            if T > self.config.block_size:
                raise ValueError(f"Sequence of {T} tokens exceeds the context of {self.config.block_size}.")
            pos = torch.arange(T, device=idx.device)
            mask = None
        else:
            if self.causal_mask is None:
                raise RuntimeError("Call setup_caches() before passing input_pos.")
            pos = input_pos
            # (1 or B, 1, T, cache length): the whole cache, masked; input_pos (B, T) gives each row its own positions
            mask = self.causal_mask[input_pos].unsqueeze(-3) if input_pos.dim() == 2 else self.causal_mask[input_pos][None, None]
        x = self.transformer.wte(idx)
        rope = None
        if self.config.rotary:
            rope = (self.rope_cos[pos], self.rope_sin[pos])  # (T, D), or (B, 1, T, D) for per-row positions
            if pos.dim() == 2:
                rope = (rope[0].unsqueeze(1), rope[1].unsqueeze(1))
        else:
            x = x + self.transformer.wpe(pos)
        x = dropout(self.transformer.drop, x)
        for block in self.transformer.h:
            x = block(x, input_pos, mask, rope, fill_rows)
        x = self.transformer.ln_f(x)
        if last_only:
            x = x[:, -1:, :]
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss
