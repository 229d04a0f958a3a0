"""What a checkpoint folder holds, in model.py's terms, read and checked before any weight is: each family's config
and tensor names (LLaDA, Hugging Face LLaMA, Dream, SMDM), and the files an interrupted download leaves broken, each
named in one line. model.py builds on this file; it imports nothing from the project but rope.py's list of methods."""
import json
import math
import re
import struct
from pathlib import Path

from rope import SCALING_METHODS


class UserError(ValueError):
    """A mistake in what the user asked for (a path, a flag, a config): scripts print it as one line."""


def read_json(path):
    """A JSON object the code reads (config.json, the shard index, lit_config.json), or one line naming the file."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as e:  # not JSON, or not UTF-8 (a UnicodeDecodeError is a ValueError)
        raise UserError(f"{path} is not valid JSON ({e}): download it again") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} holds no JSON object: download it again")
    return value


# ----------------------------------------------------------------------------- the families' configs

# LLaDA config.json values this code does not implement: anything else is refused, not silently ignored.
REQUIRED = dict(block_type="llama", activation_type="silu", layer_norm_type="rms", weight_tying=False,
                alibi=False, include_bias=False, include_qkv_bias=False, bias_for_layer_norm=False,
                layer_norm_with_affine=True, rope=True, rope_full_precision=True, scale_logits=False,
                input_emb_norm=False, attention_layer_norm=False, clip_qkv=None, block_group_size=1)
LLADA_KEYS = ("d_model n_heads n_kv_heads n_layers mlp_hidden_size vocab_size embedding_size rope_theta "
              "max_sequence_length rms_norm_eps mask_token_id eos_token_id pad_token_id eot_token_id "
              "rope_scaling").split()
HF_REQUIRED = dict(llama=dict(hidden_act="silu", tie_word_embeddings=False, attention_bias=False, mlp_bias=False),
                   dream=dict(hidden_act="silu", tie_word_embeddings=False, use_sliding_window=False))
# Dream-v0 was trained on 2048-token sequences (Dream-org's figure, which LongLLaDA's Dream settings use: NTK lambda 5
# for 4k); its config.json keeps Qwen2.5's max_position_embeddings, 131072, which Dream never trained at.
DREAM_TRAINED_LENGTH = 2048
# SMDM (Nie et al., ICLR 2025, ML-GSAI/SMDM): lit-gpt's Config values its models use; its files carry no config.
SMDM_REQUIRED = dict(rotary_percentage=1.0, parallel_residual=False, bias=False, shared_attention_norm=False,
                     _mlp_class="LLaMAMLP", condense_ratio=1)
# SMDM's lit_gpt/config.py Diff_LLaMA_{N}M (N: non-embedding parameters): n_layer, n_head, n_embd, intermediate_size.
# All: vocabulary 32000 (Llama-2's), block_size 2048, full rotary, no biases, RMSNorm eps 1e-5, n_query_groups = n_head.
SMDM_SIZES = {"6M": (6, 4, 256, 1024), "19M": (8, 6, 384, 1536), "34M": (8, 8, 512, 2048), "48M": (9, 9, 576, 2304),
              "66M": (10, 10, 640, 2560), "85M": (13, 10, 640, 2560), "75M": (16, 8, 640, 1600),
              "113M": (12, 12, 768, 3072), "142M": (15, 12, 768, 3072), "170M": (18, 12, 768, 3072),
              "180M": (14, 14, 896, 3584), "206M": (16, 14, 896, 3584), "231M": (18, 14, 896, 3584),
              "268M": (16, 16, 1024, 4096), "302M": (18, 16, 1024, 4096), "336M": (20, 16, 1024, 4096),
              "1028M": (20, 14, 1792, 7168)}


def refuse_unsupported(cfg, required, file="config.json"):
    for key, want in required.items():
        if cfg.get(key, want) != want:
            raise UserError(f"{file}: {key}={cfg[key]!r} is not implemented (this code supports {want!r})")


def llada_fields(cfg):
    """LLaDA's config.json (OLMo's field names, which model.py keeps): the keys that matter; a LLaDA config cannot
    make the model causal."""
    refuse_unsupported(cfg, REQUIRED | dict(model_type="llada"))
    out = {k: cfg[k] for k in ("d_model", "n_heads", "n_layers", "vocab_size")}  # KeyError: the caller names it
    out |= {k: cfg[k] for k in LLADA_KEYS if cfg.get(k) is not None}
    out["mlp_hidden_size"] = cfg.get("mlp_hidden_size") or cfg.get("mlp_ratio", 4) * cfg["d_model"]  # OLMo's fallback
    out["embedding_size"] = cfg.get("embedding_size") or cfg["vocab_size"]
    return out


def hf_fields(cfg, family):
    """A Hugging Face config.json: LLaMA (the paper's autoregressive baseline) or Dream (Qwen2 field names, q/k/v
    biases, bidirectional)."""
    rope = cfg.get("rope_parameters") or {}  # transformers 5.x write base and scaling here instead of top level
    d, heads, eos = cfg["hidden_size"], cfg["num_attention_heads"], cfg.get("eos_token_id")
    refuse_unsupported(cfg, HF_REQUIRED[family] | {"head_dim": d // heads})
    eos = eos if isinstance(eos, list) else [eos]  # LLaMA-3 Instruct lists end-of-text and end-of-turn
    scaling = cfg.get("rope_scaling") or rope
    if scaling and cfg.get("original_max_position_embeddings"):  # Phi-3 style: T0 at the top level
        scaling = dict(original_max_position_embeddings=cfg["original_max_position_embeddings"]) | scaling
    dream, max_len = family == "dream", cfg["max_position_embeddings"]
    return dict(d_model=d, n_heads=heads, n_kv_heads=cfg.get("num_key_value_heads") or heads,
                n_layers=cfg["num_hidden_layers"], mlp_hidden_size=cfg["intermediate_size"],
                vocab_size=cfg["vocab_size"], embedding_size=cfg["vocab_size"],
                rope_theta=cfg.get("rope_theta") or rope.get("rope_theta", 10000.0),
                max_sequence_length=min(max_len, DREAM_TRAINED_LENGTH) if dream else max_len,
                rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), mask_token_id=cfg.get("mask_token_id") if dream else None,
                eos_token_id=eos[0], eot_token_id=eos[-1], pad_token_id=cfg.get("pad_token_id"), rope_scaling=scaling,
                model_type=family, causal=not dream, qkv_bias=dream, rope_full_precision=False)


def smdm_file(folder):
    """The one .safetensors file of a folder without config.json (SMDM's): in it, or in the subfolder that
    `hf download nieshen/SMDM mdm_safetensors/...` puts it in. None if there is none."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*_safetensors/*.safetensors"))
    if len(files) > 1:
        raise UserError(f"{folder} holds {len(files)} .safetensors files, no model.safetensors.index.json and no "
                        "config.json: keep one SMDM file per folder")
    return files[0] if files else None


def smdm_fields(folder, file):
    """An SMDM model: the file's name (`{mdm|ar}-{size}-{FLOPs}e18.safetensors`) says which of the pair and its size,
    lit_config.json (lit-gpt's Config as JSON), if there, the architecture. The MDM (`TransEncoder`) is bidirectional
    and has one more embedding row than head rows, its mask token, an input only; the AR twin (`GPT`) is causal."""
    match = re.fullmatch(r"(mdm|ar)-([^-]+)-.*", file.stem)
    if match is None:
        raise UserError(f"no config.json in {folder}, and {file.name} is not named as SMDM names its files "
                        "({mdm|ar}-{size}-{FLOPs}e18.safetensors)")
    kind, size = match.groups()
    lit = next((p / "lit_config.json" for p in (folder, file.parent) if (p / "lit_config.json").is_file()), None)
    if lit:
        cfg = read_json(lit)
        norm = cfg.get("_norm_class", "RMSNorm").removeprefix("Fused")  # FusedRMSNorm: RMSNorm in one kernel
        refuse_unsupported(cfg | dict(_norm_class=norm), SMDM_REQUIRED | dict(_norm_class="RMSNorm"), lit)
        try:
            layers, heads, d, hidden = (cfg[k] for k in ("n_layer", "n_head", "n_embd", "intermediate_size"))
            vocab, length, eps = cfg.get("padded_vocab_size") or cfg["vocab_size"], cfg["block_size"], cfg["norm_eps"]
        except KeyError as e:
            raise UserError(f"{lit} has no {e} key") from None
        groups = cfg.get("n_query_groups")
    elif size in SMDM_SIZES:
        (layers, heads, d, hidden), vocab, length, eps, groups = SMDM_SIZES[size], 32000, 2048, 1e-5, None
    else:
        raise UserError(f"{file.name}: unknown SMDM size {size!r} and no lit_config.json in {folder} to give the "
                        f"architecture (sizes: {', '.join(SMDM_SIZES)})")
    mdm = kind == "mdm"
    # Llama-2's tokenizer (TinyLlama's tokenizer.json): <s> 1, </s> 2, no pad; the MDM's mask is the extra row.
    return dict(d_model=d, n_heads=heads, n_kv_heads=groups or heads, n_layers=layers, mlp_hidden_size=hidden,
                vocab_size=vocab, embedding_size=vocab + mdm, logits_size=vocab, rope_theta=10000.0,
                max_sequence_length=length, rms_norm_eps=eps, mask_token_id=vocab if mdm else None, eos_token_id=2,
                eot_token_id=None, pad_token_id=None, model_type="smdm", causal=not mdm, rope_bf16_table=True)


def config_fields(path):
    """A checkpoint folder's config as LLaDAConfig's fields: from config.json (LLaDA's, HF LLaMA's or Dream's), or,
    without one, from an SMDM file."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"model folder not found: {path}")
    if not (path / "config.json").is_file():
        file = None if (path / "model.safetensors.index.json").exists() else smdm_file(path)
        if file is None:
            raise UserError(f"no config.json in {path} (nor an SMDM .safetensors file)")
        return smdm_fields(path, file)
    cfg = read_json(path / "config.json")
    try:
        return hf_fields(cfg, cfg["model_type"].lower()) if cfg.get("model_type") in ("llama", "Dream") else \
            llada_fields(cfg)
    except KeyError as e:
        raise UserError(f"{path / 'config.json'} has no {e} key: download it again") from None


# Keys HF requires per scaling method (`_validate_*_parameters`); T0 and yarn's / longrope's factor have defaults.
SCALING_KEYS = dict(linear=["factor"], dynamic=["factor"], yarn=["factor"], longrope=["factor", "long_factor",
                    "short_factor"], llama3=["factor", "low_freq_factor", "high_freq_factor"])


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


# ----------------------------------------------------------------------------- tensor names and files

# Each family's tensor names -> model.py's module names, replaced in this order: HF's model.layers.3.self_attn.o_proj
# .weight -> transformer.blocks.3.attn_out.weight; LLaDA's names only lose "model.".
RENAMES = dict(
    llada=[("model.transformer.", "transformer.")],
    llama=[("model.embed_tokens", "transformer.wte"), ("model.norm", "transformer.ln_f"),
           ("lm_head", "transformer.ff_out"), ("model.layers", "transformer.blocks"),
           ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ff_norm"), ("self_attn.o_proj", "attn_out"),
           ("self_attn.", ""), ("mlp.gate_proj", "ff_proj"), ("mlp.up_proj", "up_proj"), ("mlp.down_proj", "ff_out")],
    smdm=[("transformer.h.", "transformer.blocks."), ("norm_1", "attn_norm"), ("norm_2", "ff_norm"),
          ("attn.attn", "attn_qkv"), ("attn.proj", "attn_out"), ("mlp.swiglu.w1", "ff_proj"),  # w1: the gate (SiLU)
          ("mlp.swiglu.w2", "up_proj"), ("mlp.swiglu.w3", "ff_out"), ("lm_head", "transformer.ff_out")])
RENAMES["dream"] = RENAMES["llama"]  # Qwen2's names are LLaMA's


def module_name(key, model_type):
    """Checkpoint tensor name -> module name (an unknown name stays unknown, to be reported); None for a tensor that
    is not a weight (the rotary inv_freq buffer older HF LLaMA files carry: RoPE is computed)."""
    if key.endswith("rotary_emb.inv_freq"):
        return None
    for old, new in RENAMES[model_type]:
        key = key.replace(old, new)
    return key


def fused_shapes(c):
    """The shapes of SMDM's fused q/k/v weights (`attn.attn.weight`, one per layer), which split_fused splits."""
    rows = (c.n_heads + 2 * c.n_kv_heads) * c.head_dim
    return {f"transformer.blocks.{i}.attn_qkv.weight": [rows, c.d_model] for i in range(c.n_layers)} \
        if c.model_type == "smdm" else {}


def split_fused(state, c):
    """SMDM's fused q/k/v weights split once, at load, into q_proj, k_proj and v_proj. lit-gpt groups the rows per
    key/value head: its n_heads / n_kv_heads query heads, then its key head, then its value head ([q_h | k_h | v_h]
    per head for multi-head attention), not three blocks [q | k | v]."""
    for name in [n for n in state if n.endswith(".attn_qkv.weight")]:
        per_kv = c.n_heads // c.n_kv_heads
        w = state.pop(name).view(c.n_kv_heads, per_kv + 2, c.head_dim, c.d_model)  # (groups, q.. k v, hs, C)
        for part, rows in zip(("q_proj", "k_proj", "v_proj"), w.split([per_kv, 1, 1], dim=1)):
            state[name.replace("attn_qkv", part)] = rows.reshape(-1, c.d_model)  # (heads * hs, C)
    return state


def check_safetensors(path):
    """A shard's size against its own header, which gives every tensor's byte range: 8 bytes holding the header's
    length N, N bytes of JSON, then the data. A download cut short fails here in one line, before any weight is read
    (safetensors would fail with a traceback); only the header is read, so a good load costs nothing."""
    size, header = path.stat().st_size, None
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8).ljust(8, b"\xff"))[0]  # a file under 8 bytes gives a huge N
        if n <= size - 8:
            try:
                header = json.loads(f.read(n))
                end = 8 + n + max([t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"] or [0])
            except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                header = None
    if header is None:
        raise UserError(f"{path} is cut short or not a safetensors file (its header does not parse): download it again")
    if size != end:
        raise UserError(f"{path} is {size:,} bytes but its header says {end:,}: the download is incomplete or damaged; "
                        "download it again")


def shard_files(path, model_type):
    """The weight files, each checked complete: the shards named by model.safetensors.index.json (each once, in
    order), the one model.safetensors, or SMDM's one file."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index} has no weight_map: download it again")
        files = [path / name for name in dict.fromkeys(weight_map.values())]
    else:
        files = [smdm_file(path) if model_type == "smdm" else path / "model.safetensors"]
    missing = [f for f in files if not f.exists()]
    if missing:
        raise UserError(f"missing weights file: {missing[0]}")
    for f in files:
        check_safetensors(f)
    return files
