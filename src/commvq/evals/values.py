"""Value-codec errors per layer against the frozen model: value MSE and attention-output MSE,
for the learned codec and a KIVI-style per-token scalar quantizer at the same bits."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from commvq.codecs import kivi
from commvq.codecs.value_codec import ValueCodec
from commvq.integrations.hf.probe import LayerAttention, layer_inputs


@torch.no_grad()
def value_errors(
    model,
    codecs: dict[str, ValueCodec],
    batches: Iterable[torch.Tensor],
    kivi_bits: list[int],
    kivi_group: int = 32,
) -> list[dict[str, dict[str, float]]]:
    """Per layer: ``{method: {"value_mse", "attn_mse"}}`` summed over the batches, averaged per
    element."""
    rows: list[dict[str, dict[str, float]]] = []
    count = 0
    for batch in batches:
        count += 1
        for layer, hidden in enumerate(layer_inputs(model, batch)):
            if layer == len(rows):
                rows.append({})
            probe = LayerAttention(model, layer, hidden)
            v = probe.v.float()
            candidates = {name: c.layers[layer].eval()(v) for name, c in codecs.items()}
            for b in kivi_bits:
                candidates[f"kivi{b}"] = kivi.quantize_values(v, b, kivi_group)
            for name, v_hat in candidates.items():
                acc = rows[layer].setdefault(name, {"value_mse": 0.0, "attn_mse": 0.0})
                acc["value_mse"] += float(((v_hat - v) ** 2).mean())
                acc["attn_mse"] += float(
                    ((probe.output(v_hat).float() - probe.exact.float()) ** 2).mean()
                )
    for row in rows:
        for acc in row.values():
            for k in acc:
                acc[k] /= max(count, 1)
    return rows
