import pytest

from commvq.spec import ModelSpec
from tests.helpers import tiny_config


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_spec_from_config_reads_shapes(arch):
    spec = ModelSpec.from_config(tiny_config(arch, num_attention_heads=8, num_key_value_heads=2))
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads) == (2, 8, 2)
    assert spec.head_dim == 64 // 8
    assert spec.kv_dim == 2 * spec.head_dim and spec.q_dim == 8 * spec.head_dim
    assert spec.gqa_ratio == 4 and spec.num_pairs == spec.head_dim // 2
    assert spec.max_position == 256
    assert spec.model_type == arch


def test_spec_explicit_head_dim_and_rope_theta():
    cfg = tiny_config(
        "llama", head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 5e5}
    )
    spec = ModelSpec.from_config(cfg)
    assert spec.head_dim == 32 and spec.kv_dim == 64
    assert spec.rope_theta == 5e5 and spec.rope_type == "default"


def test_spec_round_trips_through_dict():
    spec = ModelSpec.from_config(tiny_config("qwen2"))
    assert ModelSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("bad", [dict(head_dim=7), dict(num_kv_heads=3), dict(num_layers=0)])
def test_spec_rejects_inconsistent_shapes(bad):
    base = dict(
        model_type="llama",
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        hidden_size=64,
        max_position=128,
        rope_theta=1e4,
    )
    with pytest.raises(ValueError):
        ModelSpec(**{**base, **bad})
