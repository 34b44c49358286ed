"""A GPT, read top to bottom: the decoder-only transformer of GPT-2 and nanoGPT, with optional modern parts (rotary
positions, a ReLU² MLP, QK-norm; model/config.py's GPTConfig chooses).

    token ids idx (B, T)
      -> token embeddings (B, T, C), plus learned position embeddings unless rotary turns q and k by position
      -> n_layer Blocks, each   x = x + attention(norm(x));   x = x + MLP(norm(x))
      -> a final LayerNorm, then the logits (B, T, vocab): a score for every possible next token at every position.

Training compares every position's logits with the token that really comes next (cross-entropy); generation samples
from the last position's, appends the token and runs again, the keys and values of the tokens before it kept in a KV
cache (the serving engine that does this is model/generation/). Letters in the shapes: B rows (sequences), T tokens,
C channels (n_embd), H heads, D = C / H channels a head, L positions a query attends over (T, or the cache's length).
docs/how-it-works.md goes from each concept to its lines here; model/numpy_gpt.py is the same forward in NumPy.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import GPTConfig

# --- positions: rotary embeddings --------------------------------------------------------------------------------


def rotary_tables(length: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (length, D) of the rotary angles: position p turns the channel pair (i, i + D/2) of each head by
    the angle p * theta_i, theta_i = base^(-2i/D), fast turns for the first pairs, slow ones for the last. Both halves
    of a row hold the same D/2 angles (GPT-NeoX's and Llama's layout)."""
    theta = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (D/2,)
    angles = torch.outer(torch.arange(length, dtype=torch.float32), theta)  # (length, D/2): p * theta_i
    angles = torch.cat((angles, angles), dim=-1)  # (length, D)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last axis: each pair (x_i, x_{i+D/2}) turned a quarter."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., T, D) with each pair (x_i, x_{i+D/2}) rotated by its position's angle a, as a complex number:
        (x_i, x_{i+D/2}) -> (x_i cos a - x_{i+D/2} sin a,  x_{i+D/2} cos a + x_i sin a) = x cos + rotate_half(x) sin.
    Applied to queries and keys, q . k then depends on how far apart their positions are, not on where they are."""
    if cos.dtype != x.dtype:  # under autocast q and k are bf16, the tables fp32
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


# --- which keys a query may see: the causal mask -----------------------------------------------------------------


def causal_mask(length: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """(length, length), added to the attention scores: row i (a query at position i) is 0 at keys j <= i and -inf at
    keys j > i, its future, which softmax then gives weight 0. So a position's output never depends on later tokens,
    and one pass over a text trains every position's next-token prediction at once.

        [[0, -inf, -inf],
         [0,    0, -inf],
         [0,    0,    0]]
    """
    return torch.full((length, length), float("-inf"), dtype=dtype, device=device).triu(1)


# --- the KV cache: the keys and values of earlier tokens, for generation -----------------------------------------


class KVCache(nn.Module):
    """Keys and values (B, H, max_len, D) of the positions generated so far, preallocated: generating a token then
    computes q, k and v for that token only, and its query attends over every earlier key in the cache."""

    def __init__(self, batch_size: int, n_head: int, max_len: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        shape = (batch_size, n_head, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new tokens' k and v (B, H, T, D) at their positions input_pos (T,); return the whole cache, which
        the causal mask limits to the positions written so far."""
        self.k[:, :, input_pos] = k
        self.v[:, :, input_pos] = v
        return self.k, self.v


# --- the transformer block: attention, then an MLP ---------------------------------------------------------------


def dropout(layer: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    """layer(x) while training; x itself otherwise, where dropout does nothing (and so costs no operator)."""
    return layer(x) if layer.training and layer.p > 0 else x


class CausalSelfAttention(nn.Module):
    """Every position looks at itself and the positions before it: per head, softmax(q k^T / sqrt(D) + mask) v."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.qk_norm = config.qk_norm
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k and v in one product
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.kv_cache: KVCache | None = None  # set by GPT.setup_caches for generation; training has none

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, mask: torch.Tensor | None,
                input_pos: torch.Tensor | None = None, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, C) -> (B, T, C), and with need_weights the attention weights (B, H, T, L) (else None).
        rope: cos and sin of the positions; mask: the causal mask's rows of the positions, or None for a whole text
        from position 0; input_pos: the positions, where the KV cache stores k and v."""
        H, D = self.n_head, self.head_dim
        # A query, a key and a value vector for every token (what it looks for, what it offers, what it passes on),
        # split into H heads of D channels that attend on their own: (B, T, 3C) -> (B, T, 3H, D) -> (B, 3H, T, D)
        qkv = self.c_attn(x).unflatten(-1, (3 * H, D)).transpose(1, 2)
        qk, v = qkv.split((2 * H, H), dim=1)  # the queries' and keys' heads (B, 2H, T, D), the values' (B, H, T, D)
        if self.qk_norm:  # each head's q and k scaled to unit RMS, which keeps the scores in a trainable range
            qk = F.rms_norm(qk, (D,))
        if rope is not None:  # q and k turned by their positions (the same angles for both: one call turns both)
            qk = apply_rotary(qk, *rope)
        q, k = qk.split(H, dim=1)  # (B, H, T, D) each
        if input_pos is not None:  # generation: store these tokens' k and v in the cache, attend over all it holds
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, H, L, D)
        weights = None
        if need_weights:  # the formula, step by step, and its weights kept to be looked at
            scores = q @ k.transpose(-2, -1) * D ** -0.5 + mask  # (B, H, T, L): how well each query matches each key
            weights = torch.softmax(scores, dim=-1)  # each query's weights over the keys it may see, summing to 1
            y = dropout(self.attn_dropout, weights) @ v  # (B, H, T, D): the weighted mean of those keys' values
        else:  # the same in one fused kernel; for a whole text (no mask given) the kernel applies the causal mask itself
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).flatten(2)  # (B, T, H, D) -> (B, T, C): the heads side by side again
        return dropout(self.resid_dropout, self.c_proj(y)), weights


class MLP(nn.Module):
    """Each position on its own: widen to 4C, a nonlinearity, back to C. Most of a block's parameters are here."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.relu2 = config.mlp == "relu2"
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        h = F.relu(h).square() if self.relu2 else self.gelu(h)  # ReLU squared, or GPT-2's GELU
        return dropout(self.dropout, self.c_proj(h))


class Block(nn.Module):
    """A pre-LayerNorm transformer block: each part reads a normalized copy of x and adds its output to x (the residual
    stream), so gradients reach every layer through the additions."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, mask: torch.Tensor | None,
                input_pos: torch.Tensor | None = None, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        a, weights = self.attn(self.ln_1(x), rope, mask, input_pos, need_weights)
        x = x + a
        return x + self.mlp(self.ln_2(x)), weights


# --- the model ---------------------------------------------------------------------------------------------------


class GPT(nn.Module):
    """Token and position embeddings, n_layer Blocks, a final LayerNorm and the tied output head."""

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
        self.lm_head.weight = self.transformer.wte.weight  # tied: a token's output row is its input embedding
        if init_weights:
            self.apply(self._init_weights)
            # GPT-2's scaled init of the residual projections.
            for name, p in self.named_parameters():
                if name.endswith("c_proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.rotary:  # not saved: rebuilt from the config
            cos, sin = rotary_tables(config.block_size, config.n_embd // config.n_head)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        # The causal mask over the KV caches' positions, made with them by setup_caches; a buffer, so .to() moves it.
        self.register_buffer("causal_mask", None, persistent=False)

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

    def setup_caches(self, batch_size: int, max_len: int | None = None, cache: type[KVCache] = KVCache) -> None:
        """A KV cache in every layer for batch_size sequences of up to max_len tokens (default: the context), and the
        causal mask over its positions: what generating needs. cache: the class of the caches (the serving engine
        gives its own, model/generation/cache.py)."""
        max_len = min(max_len or self.config.block_size, self.config.block_size)
        weights = self.transformer.ln_f.weight
        for block in self.transformer.h:
            block.attn.kv_cache = cache(batch_size, self.config.n_head, max_len, self.config.n_embd // self.config.n_head,
                                        weights.dtype).to(weights.device)
        self.causal_mask = causal_mask(max_len, weights.dtype, weights.device)

    def clear_caches(self) -> None:
        """Drop the KV caches and their mask."""
        for block in self.transformer.h:
            block.attn.kv_cache = None
        self.causal_mask = None

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, input_pos: torch.Tensor | None = None,
                last_only: bool = False, need_weights: bool = False):
        """Logits (B, T, vocab) of idx (B, T) and, given targets, the mean cross-entropy loss: (logits, loss); with
        need_weights also every layer's attention weights (B, H, T, L): (logits, loss, weights).

        input_pos: None for a whole text from position 0 (training, scoring); with KV caches set up (setup_caches), the
        positions of idx's tokens (T,), whose keys and values go to the cache (a prompt at 0..T-1, then one token at a
        time). The serving engine also gives each row its own positions, as (B, T). last_only: the logits of the
        final position only, what generating needs.
        """
        B, T = idx.shape
        if input_pos is None:  # a whole text from position 0
            if T > self.config.block_size:
                raise ValueError(f"Sequence of {T} tokens exceeds the context of {self.config.block_size}.")
            pos = torch.arange(T, device=idx.device)
        elif self.causal_mask is None:
            raise RuntimeError("Call setup_caches() before passing input_pos.")
        else:  # after the tokens in the KV cache
            pos = input_pos
        # The positions with a head axis, to broadcast over the heads: (T,), the same for every row, as (1, 1, T);
        # (B, T), each row its own (the serving engine's rows of different requests), as (B, 1, T).
        head_pos = torch.atleast_2d(pos).unsqueeze(1)
        # The causal mask: over a KV cache, its rows of these positions (1 or B, 1, T, L), a column per cached
        # position; for a whole text the fused attention kernel applies it itself, unless the weights are asked for.
        if input_pos is not None:
            mask = self.causal_mask[head_pos]
        elif need_weights:
            mask = causal_mask(T, self.transformer.ln_f.weight.dtype, idx.device)
        else:
            mask = None
        x = self.transformer.wte(idx)  # (B, T, C): each token's embedding
        rope = None
        if self.config.rotary:  # (1 or B, 1, T, D): the angles of these positions
            rope = (self.rope_cos[head_pos], self.rope_sin[head_pos])
        else:
            x = x + self.transformer.wpe(pos)  # a learned vector per position
        x = dropout(self.transformer.drop, x)
        weights = []
        for block in self.transformer.h:
            x, w = block(x, rope, mask, input_pos, need_weights)
            weights.append(w)
        x = self.transformer.ln_f(x)
        if last_only:
            x = x[:, -1:, :]
        logits = self.lm_head(x)  # (B, T, vocab): each row of lm_head is a token's embedding, scored against x
        loss = None
        if targets is not None:  # -log p(the real next token), averaged over positions: nats per token
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return (logits, loss, weights) if need_weights else (logits, loss)
