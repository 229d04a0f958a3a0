"""LLaDA-8B in one file: a LLaMA-style transformer without a causal mask (Nie et al. 2025, arXiv 2502.09992).

Read top to bottom: config -> RMSNorm -> attention + MLP -> block -> model -> loading. The forward pass follows
the official `modeling_llada.py` op for op. Module names are the checkpoint's tensor names minus "model.", so
loading is one strict `load_state_dict`. HF LLaMA (the causal baseline), Dream (Qwen2.5 without the causal mask,
q/k/v biases; the second diffusion family) and SMDM's small MDM/AR pairs load too, with their own names, RoPE
precision and padding convention (checkpoints.py reads each family's files).
"""
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from checkpoints import (UserError, config_fields, fused_shapes, module_name, rope_scaling_config, shard_files,
                         split_fused)
from rope import apply_rope, rope_cos_sin, scaled_inv_freq


@dataclass
class LLaDAConfig:
    """Defaults are LLaDA-8B (Base, Instruct, 1.5); `read_config` fills it from a checkpoint (LLaDA, LLaMA, Dream,
    SMDM)."""
    d_model: int = 4096
    n_heads: int = 32
    n_kv_heads: int = 32
    n_layers: int = 32
    mlp_hidden_size: int = 12288
    vocab_size: int = 126464
    embedding_size: int = 126464  # rows of wte (and of ff_out, the logits' columns, unless logits_size says)
    logits_size: int | None = None  # rows of ff_out where they differ: SMDM's MDM has an extra wte row, its mask
    rope_theta: float = 500000.0
    max_sequence_length: int = 4096  # the trained length; nothing enforces it (that is the paper's topic)
    rms_norm_eps: float = 1e-5
    mask_token_id: int | None = 126336
    eos_token_id: int = 126081
    eot_token_id: int | None = 126348  # <|eot_id|> of the Instruct chat template; not in config.json
    pad_token_id: int = 126081
    rope_scaling: dict | None = None  # a HF rope-scaling dict: PI, dynamic NTK, YaRN, LLaMA-3.1, LongRoPE (rope.py)
    model_type: str = "llada"  # "llada", "llama" (HF LLaMA), "dream" (Dream-v0, DiffuCoder: Qwen2 names) or "smdm"
    causal: bool = False  # True only for the autoregressive baselines (HF LLaMA, SMDM's AR twin)
    qkv_bias: bool = False  # Dream (Qwen2) has biases on q, k and v
    rope_full_precision: bool = True  # LLaDA rotates in fp32; HF LLaMA and Dream in the activations' dtype
    rope_bf16_table: bool = False  # SMDM rounds its cos/sin tables to bf16 (also for fp32 weights), rotates in fp32

    @property
    def head_dim(self):
        return self.d_model // self.n_heads


def read_config(path):
    """The checkpoint folder's config as an LLaDAConfig: LLaDA's config.json, a HF LLaMA or Dream one, or an SMDM file
    (checkpoints.py reads each family's)."""
    config = LLaDAConfig(**config_fields(path))
    if config.eot_token_id is not None and config.eot_token_id >= config.embedding_size:
        config.eot_token_id = None  # <|eot_id|> exists only in the real 126k vocabulary
    return config


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in fp32, cast back, then times the weight (LLaDA's order of ops)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Block(nn.Module):
    """Pre-norm block: x + attn(attn_norm(x)), then x + mlp(ff_norm(x)). No biases, but Dream's on q, k, v."""

    def __init__(self, c):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim, self.causal = c.n_heads, c.n_kv_heads, c.head_dim, c.causal
        self.attn_norm = RMSNorm(c.d_model, c.rms_norm_eps)
        self.q_proj = nn.Linear(c.d_model, c.d_model, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=c.qkv_bias)  # GQA: fewer key/value heads
        self.v_proj = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.attn_out = nn.Linear(c.d_model, c.d_model, bias=False)
        self.ff_norm = RMSNorm(c.d_model, c.rms_norm_eps)
        self.ff_proj = nn.Linear(c.d_model, c.mlp_hidden_size, bias=False)  # the gate (through SiLU)
        self.up_proj = nn.Linear(c.d_model, c.mlp_hidden_size, bias=False)
        self.ff_out = nn.Linear(c.mlp_hidden_size, c.d_model, bias=False)
        self.capture = None  # a list, to receive this layer's queries and keys after RoPE (qk_states.py, Fig. 5)

    def attention(self, x, cos, sin, bias, kv=None, pos=0):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.capture is not None:
            self.capture += [q, k]
        if kv is not None:  # these T tokens sit at positions pos..pos+T-1 of a cached sequence
            kv[0][:, :, pos:pos + T], kv[1][:, :, pos:pos + T] = k, v  # their keys/values replace the kept ones
            end = pos + T if self.causal else None  # causal: the keys so far; bidirectional: all, stale ones too
            k, v = kv[0][:, :, :end], kv[1][:, :, :end]  # (B, nkv, T_keys, hs)
        # LLaDA is bidirectional: every token sees every token, the defining change from LLaMA (causal).
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=self.causal and bias is None and T > 1,
                                           enable_gqa=self.n_kv_heads != self.n_heads)  # GQA: LLaMA-3, Dream
        return self.attn_out(y.transpose(1, 2).reshape(B, T, C))  # (B, nh, T, hs) -> (B, T, C)

    def mlp(self, x):
        return self.ff_out(F.silu(self.ff_proj(x)) * self.up_proj(x))

    def forward(self, x, cos, sin, bias, kv=None, pos=0):
        x = x + self.attention(self.attn_norm(x), cos, sin, bias, kv, pos)
        return x + self.mlp(self.ff_norm(x))


class LLaDA(nn.Module):
    def __init__(self, config, rope_scale=1.0):
        super().__init__()
        self.config = config
        self.rope_base = config.rope_theta * rope_scale  # LongLLaDA's static NTK: theta <- lambda * theta
        self.rope_scaling = rope_scaling_config(config.rope_scaling, config.max_sequence_length, config.head_dim)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.embedding_size, config.d_model),
            blocks=nn.ModuleList(Block(config) for _ in range(config.n_layers)),
            ln_f=RMSNorm(config.d_model, config.rms_norm_eps),
            ff_out=nn.Linear(config.d_model, config.logits_size or config.embedding_size, bias=False),  # LM head
        ))

    @property
    def device(self):
        return self.transformer.wte.weight.device

    def forward(self, ids, attention_mask=None, logits_at=None, cache=None, pos=0):
        """ids (B, T) -> logits (B, T, V); or only at `logits_at`: a slice or 1-D index tensor over T gives (B, K, V),
        a (B, T) bool mask (N, V) for its N true entries (cache, pos: see hidden_states). The LM head runs only
        there: at 24k tokens full logits are 24576 x 126464 values (6 GB in bf16) per forward, for a few dozen used."""
        x = self.hidden_states(ids, attention_mask, cache, pos)
        if logits_at is not None:
            is_mask = torch.is_tensor(logits_at) and logits_at.dtype == torch.bool
            x = x[logits_at] if is_mask else x[:, logits_at]  # (N, C) or (B, K, C)
        return self.lm_head(x)

    def lm_head(self, x):
        return self.transformer.ff_out(self.transformer.ln_f(x))

    def new_cache(self, batch, length):
        """A key/value cache of a `length`-token sequence: per layer [keys, values], each (B, nkv, length, hs),
        keys after RoPE (rotated by their own absolute positions, so they can be reused as they are)."""
        shape, w = (batch, self.config.n_kv_heads, length, self.config.head_dim), self.transformer.wte.weight
        return [[w.new_zeros(shape), w.new_zeros(shape)] for _ in self.transformer.blocks]

    def hidden_states(self, ids, attention_mask=None, cache=None, pos=0):
        """(B, T) -> (B, T, C) before the final norm. attention_mask (B, T_all), 1 = token, 0 = left padding, masks
        those keys with an additive bias, as the official LLaDA (Oct 2025) and Dream code do; LLaDA's positions stay
        0..T-1, Dream's count the tokens only (its sampler's cumsum(mask) - 1, pads at 1). With a cache (new_cache),
        `ids` are the tokens at positions pos..pos+T-1 of the cached sequence: their keys/values are written there
        and they attend to all the cache's (causal: the first pos+T), so a forward can feed only the tokens that
        changed (Fast-dLLM), or one new token (the classic KV cache)."""
        tr, T, c = self.transformer, ids.shape[1], self.config
        keys = T if cache is None else pos + T if c.causal else cache[0][0].shape[2]  # how many keys attention sees
        x = tr.wte(ids)  # (B, T, C); no scaling, no position embedding, no time embedding
        # RoPE once per forward (not once per layer), in fp32; dynamic NTK and LongRoPE look at the number of keys.
        inv, a = scaled_inv_freq(c.head_dim, self.rope_base, self.rope_scaling, c.max_sequence_length, keys, ids.device)
        positions = torch.arange(pos, pos + T, device=ids.device)  # (T,)
        if attention_mask is not None and c.model_type == "dream":
            positions = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)[:, pos:pos + T]  # (B, T)
        cos, sin = rope_cos_sin(positions, inv, a)
        if not c.rope_full_precision:  # HF casts cos and sin to the activations' dtype (bf16 in a bf16 run)
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        if c.rope_bf16_table:  # SMDM's build_rope_cache(..., dtype=torch.bfloat16), as it trained; rotation in fp32
            cos, sin = cos.bfloat16().float(), sin.bfloat16().float()
        bias, low = None, torch.finfo(x.dtype).min
        if attention_mask is not None:
            bias = (1.0 - attention_mask[:, None, None, :keys].to(x.dtype)) * low  # (B, 1, 1, K): keys only
        if c.causal and T > 1 and (bias is not None or pos > 0):  # else SDPA's is_causal (or one query: no mask)
            causal = torch.full((T, keys), low, dtype=x.dtype, device=x.device).triu(pos + 1)  # query i: keys <= pos+i
            bias = causal if bias is None else bias.minimum(causal)  # minimum: two finfo.min would overflow (NaN)
        for block, kv in zip(tr.blocks, cache or [None] * len(tr.blocks)):
            x = block(x, cos, sin, bias, kv, pos)
        return x


# ----------------------------------------------------------------------------- loading

def load_model(path, device=None, dtype=None, rope_scale=1.0, rope_scaling=None, verbose=False):
    """Load a checkpoint folder (config.json + safetensors shards: LLaDA, HF LLaMA or Dream; or SMDM's one file)
    straight onto `device`.

    The model is built on the meta device (no memory, no random init of 8B parameters), each tensor is read from
    its shard directly onto the target device and assigned as the parameter itself (`assign=True`), so only one
    copy of the weights ever exists. Default dtype: bf16 on CUDA, fp32 on CPU. `rope_scale` multiplies rope_theta
    (LongLLaDA's static NTK lambda); `rope_scaling`, a HF dict like {'rope_type': 'yarn', 'factor': 4.0}, replaces
    the checkpoint's own. A Dream model returns raw logits, as DreamModel(...).logits: the hidden state at position i
    predicts token i + 1 (the shift belongs to the sampler and the scorer)."""
    t0, path = time.time(), Path(path)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    config = read_config(path)
    config.rope_scaling = rope_scaling or config.rope_scaling
    with torch.device("meta"):
        model = LLaDA(config, rope_scale)
    names, state = {name: list(p.shape) for name, p in model.state_dict().items()}, {}
    expected = names | fused_shapes(config)  # SMDM's fused q/k/v, split below
    for file in shard_files(path, config.model_type):  # all present and complete before any weight is read
        with safe_open(file, framework="pt", device=str(device)) as f:
            for key in f.keys():
                name = module_name(key, config.model_type)
                if name is None:
                    continue
                if name not in expected:
                    raise UserError(f"unexpected tensor {key} in {file.name}")
                if f.get_slice(key).get_shape() != expected[name]:
                    raise UserError(f"tensor {key} in {file.name} has shape {f.get_slice(key).get_shape()}, "
                                    f"expected {expected[name]}")
                state[name] = f.get_tensor(key).to(dtype)
    missing = sorted(set(names) - set(split_fused(state, config)))
    if missing:
        raise UserError(f"checkpoint is missing {len(missing)} tensor(s), e.g. the one for {missing[0]}")
    model.load_state_dict(state, strict=True, assign=True)
    model.eval().requires_grad_(False)
    if verbose:
        n = sum(p.numel() for p in model.parameters())
        print(f"loaded {n / 1e6:,.0f}M parameters ({dtype}) to {device} in {time.time() - t0:.1f}s", file=sys.stderr)
    return model
