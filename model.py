"""LLaDA-8B in one file: a LLaMA-style transformer without a causal mask (Nie et al. 2025, arXiv 2502.09992).

Read top to bottom: config -> RMSNorm -> attention + MLP -> block -> model -> loading. The forward pass follows
the official `modeling_llada.py` op for op. Module names are the checkpoint's tensor names minus "model.", so
loading is one strict `load_state_dict`. HF LLaMA (the causal baseline) and Dream (Qwen2.5 without the causal mask,
q/k/v biases; the second diffusion family) load too, with their own names, RoPE dtype and padding convention.
"""
import json
import math
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open

from rope import SCALING_METHODS, apply_rope, rope_cos_sin, scaled_inv_freq


class UserError(ValueError):
    """A mistake in what the user asked for (a path, a flag, a config): scripts print it as one line."""


@dataclass
class LLaDAConfig:
    """Defaults are LLaDA-8B (Base, Instruct, 1.5); `load_model` fills it from config.json (LLaDA, LLaMA, Dream)."""
    d_model: int = 4096
    n_heads: int = 32
    n_kv_heads: int = 32
    n_layers: int = 32
    mlp_hidden_size: int = 12288
    vocab_size: int = 126464
    embedding_size: int = 126464  # rows of wte / ff_out; the logits have this many columns
    rope_theta: float = 500000.0
    max_sequence_length: int = 4096  # the trained length; nothing enforces it (that is the paper's topic)
    rms_norm_eps: float = 1e-5
    mask_token_id: int | None = 126336
    eos_token_id: int = 126081
    eot_token_id: int | None = 126348  # <|eot_id|> of the Instruct chat template; not in config.json
    pad_token_id: int = 126081
    rope_scaling: dict | None = None  # a HF rope-scaling dict: PI, dynamic NTK, YaRN, LLaMA-3.1, LongRoPE (rope.py)
    model_type: str = "llada"  # "llada", "llama" (HF LLaMA) or "dream" (Dream-v0, DiffuCoder: Qwen2 names)
    causal: bool = False  # True only for the autoregressive baseline (Hugging Face LLaMA checkpoints)
    qkv_bias: bool = False  # Dream (Qwen2) has biases on q, k and v
    rope_full_precision: bool = True  # LLaDA rotates in fp32; HF LLaMA and Dream in the activations' dtype

    @property
    def head_dim(self):
        return self.d_model // self.n_heads


# config.json values this file does not implement: anything else is refused, not silently ignored.
REQUIRED = dict(block_type="llama", activation_type="silu", layer_norm_type="rms", weight_tying=False,
                alibi=False, include_bias=False, include_qkv_bias=False, bias_for_layer_norm=False,
                layer_norm_with_affine=True, rope=True, rope_full_precision=True, scale_logits=False,
                input_emb_norm=False, attention_layer_norm=False, clip_qkv=None, block_group_size=1)
HF_REQUIRED = dict(llama=dict(hidden_act="silu", tie_word_embeddings=False, attention_bias=False, mlp_bias=False),
                   dream=dict(hidden_act="silu", tie_word_embeddings=False, use_sliding_window=False))
# Dream-v0 was trained on 2048-token sequences (Dream-org's figure, which LongLLaDA's Dream settings use: NTK lambda 5
# for 4k); its config.json keeps Qwen2.5's max_position_embeddings, 131072, which Dream never trained at.
DREAM_TRAINED_LENGTH = 2048
# Keys HF requires per scaling method (`_validate_*_parameters`); T0 and yarn's / longrope's factor have defaults.
SCALING_KEYS = dict(linear=["factor"], dynamic=["factor"], yarn=["factor"], longrope=["factor", "long_factor",
                    "short_factor"], llama3=["factor", "low_freq_factor", "high_freq_factor"])


def refuse_unsupported(cfg, required):
    for key, want in required.items():
        if cfg.get(key, want) != want:
            raise UserError(f"config.json: {key}={cfg[key]!r} is not implemented (this code supports {want!r})")


def rope_scaling_config(scaling, max_len, head_dim):
    """A HF rope-scaling dict checked and completed as transformers 5.x does it: `original_max_position_embeddings`
    (T0) defaults to max_len (HF: max_position_embeddings; LLaDA and Dream: the trained length), a yarn or longrope
    `factor` to max_len / T0 (a given one wins; 4.x ignores it for longrope). None for no scaling."""
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return None
    if kind not in SCALING_METHODS:
        raise UserError(f"rope scaling {kind!r} is not implemented (this code has {', '.join(SCALING_METHODS)})")
    s = dict(original_max_position_embeddings=max_len) | {k: v for k, v in scaling.items() if v is not None}
    if kind in ("yarn", "longrope"):
        s.setdefault("factor", max_len / s["original_max_position_embeddings"])
    for key in ["original_max_position_embeddings"] + SCALING_KEYS[kind]:
        n = head_dim // 2 if key in ("long_factor", "short_factor") else None  # LongRoPE: one factor per pair
        values = s.get(key) if n else [s.get(key)]
        if not isinstance(values, list) or len(values) != (n or 1) or not all(
                isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values):
            raise UserError(f"{kind} rope scaling needs {f'a list of {n}' if n else 'a'} finite positive {key}, got "
                            f"{str(s.get(key))[:80]}")
    if kind == "llama3" and s["low_freq_factor"] >= s["high_freq_factor"]:
        raise UserError("llama3 rope scaling needs low_freq_factor < high_freq_factor")
    return s | dict(rope_type=kind)


def hf_config(cfg, family):
    """A Hugging Face config.json in this file's terms: LLaMA (the paper's autoregressive baseline) or Dream (Qwen2
    field names, q/k/v biases, bidirectional)."""
    rope = cfg.get("rope_parameters") or {}  # transformers 5.x write base and scaling here instead of top level
    d, heads, eos = cfg["hidden_size"], cfg["num_attention_heads"], cfg.get("eos_token_id")
    refuse_unsupported(cfg, HF_REQUIRED[family] | {"head_dim": d // heads})
    eos = eos if isinstance(eos, list) else [eos]  # LLaMA-3 Instruct lists end-of-text and end-of-turn
    scaling = cfg.get("rope_scaling") or rope
    if scaling and cfg.get("original_max_position_embeddings"):  # Phi-3 style: T0 at the top level
        scaling = dict(original_max_position_embeddings=cfg["original_max_position_embeddings"]) | scaling
    dream, max_len = family == "dream", cfg["max_position_embeddings"]
    return LLaDAConfig(d_model=d, n_heads=heads, n_kv_heads=cfg.get("num_key_value_heads") or heads,
                       n_layers=cfg["num_hidden_layers"], mlp_hidden_size=cfg["intermediate_size"],
                       vocab_size=cfg["vocab_size"], embedding_size=cfg["vocab_size"],
                       rope_theta=cfg.get("rope_theta") or rope.get("rope_theta", 10000.0),
                       max_sequence_length=min(max_len, DREAM_TRAINED_LENGTH) if dream else max_len,
                       rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), mask_token_id=cfg.get("mask_token_id") if dream
                       else None, eos_token_id=eos[0], eot_token_id=eos[-1], pad_token_id=cfg.get("pad_token_id"),
                       rope_scaling=scaling, model_type=family, causal=not dream, qkv_bias=dream,
                       rope_full_precision=False)


def read_config(path):
    """The checkpoint folder's config.json as an LLaDAConfig (LLaDA's format, or a HF LLaMA or Dream one)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"no config.json in {path}" if path.is_dir() else f"model folder not found: {path}")
    cfg = json.loads((path / "config.json").read_text())
    if cfg.get("model_type") in ("llama", "Dream"):
        return hf_config(cfg, cfg["model_type"].lower())
    refuse_unsupported(cfg, REQUIRED | dict(model_type="llada"))
    known = {f.name for f in fields(LLaDAConfig)} - {"causal", "qkv_bias"}  # a LLaDA config is bidirectional
    config = LLaDAConfig(**{k: v for k, v in cfg.items() if k in known and v is not None})
    if cfg.get("mlp_hidden_size") is None:  # OLMo's fallback: mlp_ratio * d_model
        config.mlp_hidden_size = cfg.get("mlp_ratio", 4) * config.d_model
    config.embedding_size = cfg.get("embedding_size") or config.vocab_size
    if config.eot_token_id >= config.embedding_size:  # <|eot_id|> exists only in the real 126k vocabulary
        config.eot_token_id = None
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
            ff_out=nn.Linear(config.d_model, config.embedding_size, bias=False),  # LM head, untied from wte
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

# Hugging Face LLaMA / Qwen2 (Dream) tensor names -> this file's module names, replaced in this order (LLaDA's names
# only lose "model."): model.layers.3.self_attn.o_proj.weight -> transformer.blocks.3.attn_out.weight.
HF_LLAMA_RENAMES = [("model.embed_tokens", "transformer.wte"), ("model.norm", "transformer.ln_f"),
                    ("lm_head", "transformer.ff_out"), ("model.layers", "transformer.blocks"),
                    ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ff_norm"),
                    ("self_attn.o_proj", "attn_out"), ("self_attn.", ""), ("mlp.gate_proj", "ff_proj"),
                    ("mlp.up_proj", "up_proj"), ("mlp.down_proj", "ff_out")]


def module_name(key, model_type):
    """Checkpoint tensor name -> module name (an unknown name stays unknown, to be reported)."""
    if model_type == "llada":
        return key.removeprefix("model.")
    for old, new in HF_LLAMA_RENAMES:
        key = key.replace(old, new)
    return key


def shard_files(path):
    """The shards named by model.safetensors.index.json (each once, in order), or the one model.safetensors."""
    index = path / "model.safetensors.index.json"
    names = dict.fromkeys(json.loads(index.read_text())["weight_map"].values()) if index.exists() else []
    files = [path / name for name in names or ["model.safetensors"]]
    missing = [f for f in files if not f.exists()]
    if missing:
        raise UserError(f"missing weights file: {missing[0]}")
    return files


def load_model(path, device=None, dtype=None, rope_scale=1.0, rope_scaling=None, verbose=False):
    """Load a checkpoint folder (config.json + safetensors shards; LLaDA, HF LLaMA or Dream) straight onto `device`.

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
    expected, state = {name: p.shape for name, p in model.state_dict().items()}, {}
    for file in shard_files(path):
        with safe_open(file, framework="pt", device=str(device)) as f:
            for key in f.keys():
                if key.endswith("rotary_emb.inv_freq"):  # a buffer older HF LLaMA files carry; RoPE is computed
                    continue
                name = module_name(key, config.model_type)
                if name not in expected:
                    raise UserError(f"unexpected tensor {key} in {file.name}")
                if f.get_slice(key).get_shape() != list(expected[name]):
                    raise UserError(f"tensor {key} in {file.name} has shape {f.get_slice(key).get_shape()}, "
                                    f"expected {list(expected[name])}")
                state[name] = f.get_tensor(key).to(dtype)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise UserError(f"checkpoint is missing {len(missing)} tensor(s), e.g. the one for {missing[0]}")
    model.load_state_dict(state, strict=True, assign=True)
    model.eval().requires_grad_(False)
    if verbose:
        n = sum(p.numel() for p in model.parameters())
        print(f"loaded {n / 1e6:,.0f}M parameters ({dtype}) to {device} in {time.time() - t0:.1f}s", file=sys.stderr)
    return model
