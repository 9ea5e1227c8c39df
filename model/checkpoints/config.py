"""Model configuration read from a Hugging Face model directory."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
# What a config.json without `architectures` is taken to be.
ARCHITECTURE_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class ConfigError(ValueError):
    """A config.json that sinkserve cannot serve; the message names the field."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    # llama3 only
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"rope_scaling.rope_type={self.rope_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        if self.theta <= 0 or self.factor <= 0:
            raise ConfigError("rope_theta and rope_scaling.factor must be positive")


@dataclass(frozen=True)
class ModelConfig:
    """The sizes and options of a LLaMA-shaped decoder."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    architecture: str = "LlamaForCausalLM"

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE")

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> "ModelConfig":
        model_dir = Path(model_dir)
        path = model_dir / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json in {model_dir}")
        hf = _read_json(path)
        eos = hf.get("eos_token_id", 2)
        gen_path = model_dir / "generation_config.json"
        if gen_path.is_file():
            eos = _read_json(gen_path).get("eos_token_id", eos)
        return cls.from_hf_dict(hf, eos_token_ids=eos)

    @classmethod
    def from_hf_dict(cls, hf: dict, eos_token_ids: int | list[int] | None = None) -> "ModelConfig":
        archs = hf.get("architectures") or []
        if not archs:
            if hf.get("model_type") not in ARCHITECTURE_BY_MODEL_TYPE:
                raise ConfigError(
                    f"config.json has no 'architectures' field and its model_type={hf.get('model_type')!r} "
                    f"is not one of {', '.join(ARCHITECTURE_BY_MODEL_TYPE)}"
                )
            archs = [ARCHITECTURE_BY_MODEL_TYPE[hf["model_type"]]]
        if archs[0] not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"architectures={archs[0]!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act={act!r} is not supported (only 'silu')")
        # Mistral's sliding window keeps original positions; a window no shorter than the
        # context is dense attention, anything else would silently change the model.
        window = hf.get("sliding_window")
        max_pos = int(hf.get("max_position_embeddings", 2048))
        if window is not None and window < max_pos:
            raise ConfigError(
                f"sliding_window={window} (< max_position_embeddings={max_pos}) is not supported; "
                "use --attention-window for windowed attention"
            )
        if hf.get("pretraining_tp", 1) != 1:
            raise ConfigError(f"pretraining_tp={hf['pretraining_tp']} is not supported (only 1)")
        num_heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        if eos_token_ids is None:
            eos_token_ids = hf.get("eos_token_id", 2)
        eos = (eos_token_ids,) if isinstance(eos_token_ids, int) else tuple(eos_token_ids or ())
        return cls(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            num_hidden_layers=int(hf["num_hidden_layers"]),
            num_attention_heads=num_heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(hf.get("head_dim") or hidden // num_heads),
            max_position_embeddings=max_pos,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope=_rope_from_hf(hf),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos,
            architecture=archs[0],
        )


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:  # malformed JSON or UTF-8, unreadable
        raise ConfigError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return data


def _rope_from_hf(hf: dict) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters` (theta inside); older configs have a top-level
    # `rope_theta` and an optional `rope_scaling`.
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if hf.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConfigError("partial_rotary_factor != 1.0 is not supported")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"rope_scaling.rope_type={rope_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    kwargs = {"theta": float(theta), "rope_type": rope_type}
    if rope_type in ("linear", "llama3"):
        if "factor" not in params:
            raise ConfigError(f"rope_scaling.factor is required for rope_type={rope_type!r}")
        kwargs["factor"] = float(params["factor"])
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if key not in params:
                raise ConfigError(f"rope_scaling.{key} is required for rope_type='llama3'")
        kwargs["low_freq_factor"] = float(params["low_freq_factor"])
        kwargs["high_freq_factor"] = float(params["high_freq_factor"])
        kwargs["original_max_position_embeddings"] = int(params["original_max_position_embeddings"])
    return RopeConfig(**kwargs)
