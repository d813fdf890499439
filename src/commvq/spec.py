"""ModelSpec: the attention shapes and RoPE settings of a model, read from its config.

Nothing about shapes is hard-coded anywhere in commvq: every module takes them from here.
The config is duck-typed (any object with the usual Hugging Face attribute names), so this
module does not import transformers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

ROPE_LAYOUT = "rotate_half"


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    max_position: int
    rope_theta: float
    rope_type: str = "default"
    rope_layout: str = ROPE_LAYOUT

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelSpec.{name}={getattr(self, name)} must be positive")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} is odd: RoPE needs an even head_dim")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )

    @property
    def kv_dim(self) -> int:
        """Channels of k_proj / v_proj output per token: num_kv_heads * head_dim."""
        return self.num_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def gqa_ratio(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def num_pairs(self) -> int:
        """RoPE pairs per head (channel j pairs with j + head_dim/2)."""
        return self.head_dim // 2

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        return cls(**d)

    @classmethod
    def from_config(cls, config: Any) -> ModelSpec:
        """Read a Hugging Face config (``LlamaConfig``, ``Qwen2Config``, ...)."""
        config = getattr(config, "text_config", None) or config
        heads = int(config.num_attention_heads)
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        hidden = int(config.hidden_size)
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        theta, rope_type = _rope_settings(config)
        return cls(
            model_type=str(getattr(config, "model_type", "unknown")),
            num_layers=int(config.num_hidden_layers),
            num_heads=heads,
            num_kv_heads=int(kv_heads),
            head_dim=int(head_dim),
            hidden_size=hidden,
            max_position=int(getattr(config, "max_position_embeddings", 0) or 0),
            rope_theta=theta,
            rope_type=rope_type,
        )


def _rope_settings(config: Any) -> tuple[float, str]:
    """(theta, rope_type) from transformers 5 ``rope_parameters`` or the older attributes."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"]), str(params.get("rope_type", "default"))
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    return float(getattr(config, "rope_theta", 10000.0)), str(rope_type)
