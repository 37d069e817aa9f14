"""Model configuration: a frozen dataclass read from an HF ``config.json``.

It lives with the verifier because the verifier (and keygen) need it without torch; the engine
imports it from here.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                           "Qwen3ForCausalLM": "qwen3", "MistralForCausalLM": "mistral",
                           "MixtralForCausalLM": "mixtral", "Qwen3MoeForCausalLM": "qwen3_moe"}
MOE_FAMILIES = ("mixtral", "qwen3_moe")
MAX_EXPERTS = 1024  # experts per layer a config may ask for (Mixtral 8, Qwen3-MoE 128)


# What the verifier replays for each family, beyond what every family shares: every linear
# (Freivalds against the key), RMSNorm, RoPE, integer-softmax attention at every opened
# position over every opened K/V row, SwiGLU, the residual chain, the LM head and the decode policy.
FAMILIES = {
    "llama": "Llama 2/3 (llama3 RoPE scaling, GQA, tied or untied head)",
    "qwen2": "Qwen2 / Qwen2.5: + q/k/v biases (from the key)",
    "qwen3": "Qwen3 dense: + RMSNorm over each q and k head before RoPE (weights from the key)",
    "mistral": "Mistral: + sliding-window attention (each query sees its last `sliding_window` "
               "keys; openings carry only the window's K/V rows)",
    "mixtral": "Mixtral: + mixture of experts: the router by Freivalds, top-k selection and "
               "combination weights replayed exactly, every selected expert's linears by "
               "Freivalds (a key row per expert matrix); a sliding window when the config has one",
    "qwen3_moe": "Qwen3-MoE: Qwen3's per-head q/k norm + Mixtral's mixture of experts (top-k "
                 "weights renormalized: norm_topk_prob; every layer sparse)",
}


class ConfigError(ValueError):
    """A config.json that is missing a field or asks for something unsupported."""


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 style frequency scaling (``rope_scaling.rope_type == "llama3"``)."""

    factor: float  # how much longer the context is than in pre-training
    low_freq_factor: float  # wavelengths above original/low_freq_factor are divided by factor
    high_freq_factor: float  # wavelengths below original/high_freq_factor are kept
    original_max_position_embeddings: int  # the pre-training context length


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and constants of a Llama/Qwen2/Qwen3/Mistral decoder."""

    family: str  # "llama", "qwen2" (q/k/v biases), "qwen3" (RMSNorm per head on q and k) or
    # "mistral" (a sliding attention window) or "mixtral" (experts, maybe a window) or
    # "qwen3_moe" (Qwen3's q/k norm and experts)
    vocab_size: int  # rows of the embedding and of the LM head
    hidden_size: int  # H, width of the residual stream
    intermediate_size: int  # F, width of the MLP
    num_layers: int  # decoder blocks
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (GQA when fewer than num_heads)
    head_dim: int  # d, from the file when present, else H / num_heads
    rms_norm_eps: float  # epsilon inside every RMSNorm
    rope_theta: float  # RoPE base
    max_position_embeddings: int  # the longest context the model supports
    tie_word_embeddings: bool  # LM head shares the embedding matrix
    attention_bias: bool  # q/k/v projections carry a bias (Qwen2)
    rope_scaling: RopeScaling | None = None  # llama3 scaling, or none
    bos_token_id: int | None = None  # beginning-of-sequence token, if any
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)  # generation stops on any
    # Mistral: a query at position p sees only keys j with p - sliding_window < j <= p (None:
    # every key j <= p, as in the other families)
    sliding_window: int | None = None
    # Mixtral, Qwen3-MoE: each layer's MLP is num_experts experts of width intermediate_size
    # (Qwen3-MoE's moe_intermediate_size), of which each token takes experts_per_token (0, 0: a
    # dense MLP)
    num_experts: int = 0
    experts_per_token: int = 0

    @property
    def moe(self) -> bool:
        """Every layer's MLP is a mixture of experts (Mixtral, Qwen3-MoE)."""
        return self.num_experts > 0

    @property
    def qk_norm(self) -> bool:
        """q and k get an RMSNorm over each head (weights [head_dim]) before RoPE (Qwen3)."""
        return self.family in ("qwen3", "qwen3_moe")

    def __post_init__(self) -> None:
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "head_dim", "max_position_embeddings")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not (self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps)):
            raise ConfigError(f"rms_norm_eps must be a positive number, got {self.rms_norm_eps}")
        if not (self.rope_theta >= sys.float_info.min and math.isfinite(self.rope_theta)):
            # a subnormal base gives infinite frequencies, so NaN RoPE tables
            raise ConfigError(f"rope_theta must be a positive normal number, got "
                              f"{self.rope_theta}")
        moe = (self.num_experts, self.experts_per_token)
        if self.family in MOE_FAMILIES:
            if not all(isinstance(n, int) and not isinstance(n, bool) for n in moe) or not (
                    1 <= self.experts_per_token <= self.num_experts <= MAX_EXPERTS):
                raise ConfigError(f"the expert count and num_experts_per_tok must be integers "
                                  f"with 1 <= per token <= experts <= {MAX_EXPERTS}, got {moe}")
        elif moe != (0, 0):
            raise ConfigError(f"{self.family} has no experts (num_experts {moe[0]})")
        w = self.sliding_window
        if w is not None and (self.family not in ("mistral", "mixtral") or isinstance(w, bool)
                              or not isinstance(w, int) or not 0 < w < 2**31):
            raise ConfigError(f"sliding_window must be a positive integer below 2^31 (Mistral "
                              f"and Mixtral only), got {w!r}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads per K/V head."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf(cls, path: str | Path) -> "ModelConfig":
        """Read ``config.json`` (a file or the folder holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: not a readable JSON file ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        """Build from the fields of an HF config; refuses what the engine does not implement."""
        family = _family(raw)
        _refuse_unsupported(raw)
        num_heads = _int(raw, "num_attention_heads")
        hidden = _int(raw, "hidden_size")
        head_dim = raw.get("head_dim")
        if head_dim is None:
            if hidden % num_heads:
                raise ConfigError("hidden_size is not a multiple of num_attention_heads "
                                  "and head_dim is not given")
            head_dim = hidden // num_heads
        rope = _rope_fields(raw)
        ffn = "moe_intermediate_size" if family == "qwen3_moe" else "intermediate_size"
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            family=family,
            vocab_size=_int(raw, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_int(raw, ffn),
            num_layers=_int(raw, "num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(_get(raw, "rms_norm_eps")),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            max_position_embeddings=_int(raw, "max_position_embeddings"),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=_attention_bias(raw, family),
            rope_scaling=_rope_scaling(rope.get("rope_scaling")),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=tuple(int(e) for e in eos_ids),
            sliding_window=raw.get("sliding_window") if family in ("mistral", "mixtral") else None,
            num_experts=_expert_count(raw) if family in MOE_FAMILIES else 0,
            experts_per_token=raw.get("num_experts_per_tok") if family in MOE_FAMILIES else 0,
        )

    def to_hf_dict(self) -> dict:
        """The HF ``config.json`` fields that describe this model."""
        arch = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}[self.family]
        out = {
            "architectures": [arch],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "float32",
        }
        if self.family in ("llama", "qwen3", "qwen3_moe"):
            out["attention_bias"] = self.attention_bias
        if self.family == "llama":
            out["mlp_bias"] = False
        if self.family in ("mistral", "mixtral"):
            out["sliding_window"] = self.sliding_window
        if self.family == "mixtral":
            out["num_local_experts"] = self.num_experts
            out["num_experts_per_tok"] = self.experts_per_token
        if self.family == "qwen3_moe":  # every layer sparse, the top k renormalized
            out |= {"num_experts": self.num_experts, "num_experts_per_tok": self.experts_per_token,
                    "moe_intermediate_size": self.intermediate_size, "norm_topk_prob": True,
                    "decoder_sparse_step": 1, "mlp_only_layers": [], "use_sliding_window": False}
        if self.rope_scaling is not None:
            out["rope_scaling"] = {"rope_type": "llama3", **asdict(self.rope_scaling)}
        if self.bos_token_id is not None:
            out["bos_token_id"] = self.bos_token_id
        if self.eos_token_ids:
            eos = list(self.eos_token_ids)
            out["eos_token_id"] = eos[0] if len(eos) == 1 else eos
        return out


def _get(raw: dict, key: str):
    if key not in raw or raw[key] is None:
        raise ConfigError(f"missing field {key!r}")
    return raw[key]


def _int(raw: dict, key: str) -> int:
    value = _get(raw, key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"field {key!r} must be an integer, got {value!r}")
    return value


def _family(raw: dict) -> str:
    archs = raw.get("architectures") or []
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return SUPPORTED_ARCHITECTURES[arch]
    model_type = raw.get("model_type")
    if not archs and model_type in ("llama", "qwen2", "qwen3", "mistral", "mixtral", "qwen3_moe"):
        return model_type
    shown = archs or model_type
    raise ConfigError(f"unsupported architecture {shown!r} (field 'architectures'); "
                      f"supported: {sorted(SUPPORTED_ARCHITECTURES)}")


def _refuse_unsupported(raw: dict) -> None:
    archs = raw.get("architectures") or []
    named = lambda arch, mt: arch in archs or (not archs and raw.get("model_type") == mt)  # noqa
    mixtral = named("MixtralForCausalLM", "mixtral")
    qwen3_moe = named("Qwen3MoeForCausalLM", "qwen3_moe")
    allowed = {"num_local_experts"} if mixtral else (
        {"num_experts", "num_local_experts"} if qwen3_moe else set())
    for key in ("num_experts", "num_local_experts", "n_routed_experts"):
        if raw.get(key) and key not in allowed:
            raise ConfigError(f"mixture-of-experts models other than Mixtral and Qwen3-MoE are "
                              f"not supported (field {key!r})")
    if mixtral and not raw.get("num_local_experts"):
        raise ConfigError("missing field 'num_local_experts'")
    if qwen3_moe:
        _refuse_qwen3_moe(raw)
    mistral = named("MistralForCausalLM", "mistral") or mixtral
    if raw.get("use_sliding_window") or (raw.get("sliding_window") and not mistral
                                         and raw.get("model_type") not in
                                         ("qwen2", "qwen3", "qwen3_moe")):
        raise ConfigError("sliding-window attention is not supported (field 'sliding_window')")
    if any(t != "full_attention" for t in raw.get("layer_types") or []):
        raise ConfigError("layers other than full attention are not supported (field "
                          "'layer_types')")
    if raw.get("use_qk_norm") or raw.get("qk_norm"):
        raise ConfigError("q/k norm (Qwen3 style) is not supported yet (field 'qk_norm')")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act {act!r} is not supported (field 'hidden_act'); only silu")
    if raw.get("mlp_bias"):
        raise ConfigError("MLP biases are not supported (field 'mlp_bias')")
    if raw.get("pretraining_tp", 1) not in (1, None):
        raise ConfigError("pretraining_tp > 1 is not supported (field 'pretraining_tp')")


def _expert_count(raw: dict):
    """Experts per layer: Mixtral's num_local_experts, Qwen3-MoE's num_experts (transformers 5
    writes it as num_local_experts); two different values are refused."""
    counts = {raw[k] for k in ("num_experts", "num_local_experts") if raw.get(k) is not None}
    if len(counts) > 1:
        raise ConfigError(f"num_experts and num_local_experts differ ({sorted(counts)})")
    return counts.pop() if counts else None


def _refuse_qwen3_moe(raw: dict) -> None:
    """Qwen3-MoE as the spec implements it: every layer sparse, the top-k weights renormalized
    (the spec's softmax over the selected experts), no shared expert."""
    if _expert_count(raw) is None:
        raise ConfigError("missing field 'num_experts'")
    if raw.get("norm_topk_prob") is not True:
        raise ConfigError("Qwen3-MoE without norm_topk_prob (top-k weights not renormalized) is "
                          "not supported (field 'norm_topk_prob')")
    if raw.get("decoder_sparse_step", 1) != 1 or raw.get("mlp_only_layers"):
        raise ConfigError("Qwen3-MoE with dense layers is not supported (fields "
                          "'decoder_sparse_step', 'mlp_only_layers')")
    if raw.get("shared_expert_intermediate_size"):
        raise ConfigError("shared experts are not supported (field "
                          "'shared_expert_intermediate_size')")
    _int(raw, "moe_intermediate_size")


def _rope_fields(raw: dict) -> dict:
    """rope_theta and rope_scaling from either layout: top-level (Hub checkpoints) or the
    ``rope_parameters`` object that transformers 5 writes."""
    params = raw.get("rope_parameters")
    if params is None:
        return {"rope_theta": raw.get("rope_theta", 10000.0), "rope_scaling": raw.get("rope_scaling")}
    if not isinstance(params, dict):
        raise ConfigError(f"field 'rope_parameters' must be an object, got {params!r}")
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    return {"rope_theta": theta, "rope_scaling": params}


def _attention_bias(raw: dict, family: str) -> bool:
    if family == "qwen2":
        return True  # Qwen2 always has q/k/v biases and none on o_proj
    if raw.get("attention_bias"):
        name = {"llama": "Llama", "qwen3": "Qwen3", "mistral": "Mistral",
                "mixtral": "Mixtral", "qwen3_moe": "Qwen3-MoE"}[family]
        raise ConfigError(f"{name} attention_bias is not supported (field 'attention_bias')")
    return False


def _rope_scaling(rs) -> RopeScaling | None:
    if rs is None:
        return None
    if not isinstance(rs, dict):
        raise ConfigError(f"field 'rope_scaling' must be an object, got {rs!r}")
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ConfigError(f"rope_scaling type {kind!r} is not supported (field 'rope_scaling'); "
                          "only 'llama3'")
    try:
        out = RopeScaling(
            factor=float(rs["factor"]),
            low_freq_factor=float(rs["low_freq_factor"]),
            high_freq_factor=float(rs["high_freq_factor"]),
            original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise ConfigError(f"rope_scaling is missing field {e.args[0]!r}") from None
    except (TypeError, ValueError, OverflowError):
        raise ConfigError("rope_scaling's factor, low_freq_factor, high_freq_factor and "
                          "original_max_position_embeddings must be numbers") from None
    # what llama3 scaling means (transformers checks the same, with warnings): a NaN, zero or
    # subnormal factor, or equal low and high factors, would divide by zero into NaN RoPE tables
    nums = (out.factor, out.low_freq_factor, out.high_freq_factor)
    if not (all(math.isfinite(x) for x in nums) and out.factor >= 1
            and 0 < out.low_freq_factor < out.high_freq_factor
            and out.original_max_position_embeddings >= 1):
        raise ConfigError(f"rope_scaling must have finite factor >= 1, 0 < low_freq_factor < "
                          f"high_freq_factor and original_max_position_embeddings >= 1, got "
                          f"{rs!r}"[:300])
    return out
