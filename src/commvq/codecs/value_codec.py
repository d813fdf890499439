"""ValueCodec: the learned binary value codec of every layer, saved as safetensors + config.json."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from commvq import __version__
from commvq.fsutil import atomic_path, write_json
from commvq.quant import binary, value_init
from commvq.quant.packing import pack_2bit, unpack_2bit

FORMAT = "commvq-value-codec"
VERSION = 1
WEIGHTS = "value_codec.safetensors"
CONFIG = "config.json"
SHARPNESS = 4.0  # logit scale of the data-driven start (training samples Gumbel noise of scale 1)
# with axes of 3-4 bits: their fine bits' logit gaps are small, and at 4 the Gumbel noise of
# training flips them (CPU, SmolLM2 layers 3 and 27, value MSE over KIVI-2 after 150 steps:
# 0.54 / 0.46 at 4, 0.46 / 0.39 at 16)
DEEP_SHARPNESS = 16.0


class LayerValueCodec(nn.Module):
    """Encoder LayerNorm -> Linear -> GELU -> Linear -> groups of 4 logits; decoder ``bits @ E``."""

    def __init__(self, width: int, quant_bits: int, scale: torch.Tensor | None = None) -> None:
        super().__init__()
        self.width, self.quant_bits = width, quant_bits
        self.groups = binary.num_groups(width, quant_bits)
        hidden = binary.hidden_size(width, quant_bits)
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, 4 * self.groups)
        nbits = width * quant_bits
        self.codebook = nn.Parameter(torch.randn(nbits, width) / math.sqrt(nbits))
        self.register_buffer("scale", torch.ones(width) if scale is None else scale.float().clone())
        # hidden units after the first 2F that compute staircase steps (a start with 3-4-bit axes):
        # training keeps them as they are then (see fixed_features)
        self.register_buffer("step_units", torch.zeros(()))
        self._fixed_fc2: torch.Tensor | None = None

    @property
    def fixed_features(self) -> bool:
        """Whether training must leave the step units as they are: all of ``fc1`` (AdamW steps of
        the learning rate move the thresholds) and ``fc2``'s weights on the step units (they
        multiply activations in the hundreds)."""
        return bool(self.step_units > 0)

    def _step_columns(self) -> slice:
        return slice(2 * self.width, 2 * self.width + int(self.step_units))

    @torch.no_grad()
    def remember_fixed(self) -> None:
        """Remember ``fc2``'s weights on the step units (on the codec's device), for
        :meth:`restore_fixed`."""
        self._fixed_fc2 = (
            self.fc2.weight[:, self._step_columns()].clone() if self.fixed_features else None
        )

    @torch.no_grad()
    def restore_fixed(self) -> None:
        """Put back what :meth:`remember_fixed` remembered (after an optimizer step moved it)."""
        if self._fixed_fc2 is not None:
            self.fc2.weight[:, self._step_columns()] = self._fixed_fc2

    @torch.no_grad()
    def init_projection(self, generator: torch.Generator) -> LayerValueCodec:
        """Start as a random-rotation sign quantizer: ``bits = sign(R u)``, ``E = R``.

        ``fc2(gelu(fc1 x)) = W x`` exactly with ``fc1 = [I; -I]`` and ``fc2 = [W, -W]``, since
        ``gelu(x) - gelu(-x) = x``; ``W`` turns ``z = R u`` into the logits of the 4 sign patterns
        of each pair of bits. Training starts from this instead of from noise.
        """
        f = self.width
        blocks = [
            torch.linalg.qr(torch.randn(f, f, generator=generator))[0]
            for _ in range(self.quant_bits)
        ]
        rot = torch.cat(blocks)  # [F*q, F], orthonormal blocks
        self.codebook.copy_(rot)
        if self.fc1.out_features < 2 * f:  # too narrow to carry x and -x: keep the random encoder
            return self
        patterns = binary.PATTERNS  # [4, 2]
        w = torch.einsum("ps,gsf->gpf", patterns, rot.reshape(self.groups, 2, f)).reshape(
            4 * self.groups, f
        )
        return self._linear_encoder(w, torch.zeros(4 * self.groups))

    @torch.no_grad()
    def _linear_encoder(self, w: torch.Tensor, b: torch.Tensor) -> LayerValueCodec:
        """Make the encoder's logits exactly ``w @ x + b`` (``x`` what the LayerNorm gives):
        ``fc1 = [I; -I]``, ``fc2 = [w, -w]``, since ``gelu(x) - gelu(-x) = x``."""
        f = self.width
        self.fc1.weight.zero_()
        self.fc1.bias.zero_()
        self.fc1.weight[:f] = torch.eye(f)
        self.fc1.weight[f : 2 * f] = -torch.eye(f)
        self.fc2.weight.zero_()
        self.fc2.weight[:, :f] = w
        self.fc2.weight[:, f : 2 * f] = -w
        self.fc2.bias.copy_(b)
        return self

    @torch.no_grad()
    def init_from_values(self, v: torch.Tensor, sharpness: float | None = None) -> LayerValueCodec:
        """Start as transform coding of sample values ``v [N, F]`` (:mod:`commvq.quant.value_init`):
        principal axes, 0-4 bits per axis (more than 2 on as many axes as the encoder's spare
        hidden units allow), and an encoder whose logits are each group's nearest-pattern logits
        (``sharpness``, default ``SHARPNESS`` or ``DEEP_SHARPNESS`` with 3-4-bit axes, scales them
        against the Gumbel noise of training). The encoder sees ``LayerNorm(u) = (u - mean) / std``:
        ``u`` is a unit vector, so ``std ~ 1/sqrt(F)``; only its component along the all-ones
        direction is lost."""
        f = self.width
        if self.fc1.out_features < 2 * f:
            raise ValueError(
                f"width {f}: the encoder's hidden size {self.fc1.out_features} cannot carry "
                "x and -x; train with --init rotation"
            )
        if len(v) < f:
            raise ValueError(f"{len(v)} sample values for width {f}: need at least {f}")
        u, _ = binary.normalize(v.float(), self.scale.to(v.device))
        power, axes = value_init.principal_axes(u)
        spare = (self.fc1.out_features - 2 * f) // 2  # steps the spare hidden units can carry
        bits = value_init.allocate_bits(
            power, f * self.quant_bits, spare // value_init.STEPS_PER_DEEP_AXIS
        )
        deep = bool((bits > 2).any())
        if sharpness is None:
            sharpness = DEEP_SHARPNESS if deep else SHARPNESS
        groups = value_init.group_layout(bits)
        rows = value_init.decoder_rows(power, axes, groups)
        if deep:  # decoding is scale-free (renormalized): the finest rows get entries AdamW steps
            # cannot swamp
            norms = rows.norm(dim=-1)
            rows = rows / norms[norms > 1e-6 * norms.max()].min()  # (rows of empty axes aside)
        self.codebook.copy_(rows)
        a, c, b = value_init.pattern_weights(power, bits, groups, binary.PATTERNS, sharpness)
        std = math.sqrt(1.0 / f + self.norm.eps)  # u = LayerNorm(u) * std for a unit u of mean 0
        w = (a.flatten(0, 1) @ axes.T * std).float()  # [4n, F] over LayerNorm(u)
        self.norm.reset_parameters()
        self._linear_encoder(w, b.flatten().float())
        if deep:  # the step units follow the 2F linear ones
            weight, bias = value_init.step_units(power, axes, bits, std)
            units = slice(2 * f, 2 * f + len(bias))
            self.fc1.weight[units] = weight.float()
            self.fc1.bias[units] = bias.float()
            self.fc2.weight[:, units] = value_init.step_readout(c).float()
        self.step_units.fill_(2 * len(value_init.steps(bits)))
        return self

    def logits(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [N, n, 4], p [N])``."""
        u, p = binary.normalize(v, self.scale.float())
        # float32 even under autocast or with the weights held in float16
        # (:meth:`ValueCodec.held_in`): a step unit reaches hundreds, and a 16-bit rounding there
        # would move the difference of a pair of them (one step) by a sizable part of the step
        f32 = nn.functional
        with torch.autocast(u.device.type, enabled=False):
            h = f32.layer_norm(
                u.float(),
                (self.width,),
                self.norm.weight.float(),
                self.norm.bias.float(),
                self.norm.eps,
            )
            h = f32.linear(
                f32.gelu(f32.linear(h, self.fc1.weight.float(), self.fc1.bias.float())),
                self.fc2.weight.float(),
                self.fc2.bias.float(),
            )
        return h.reshape(*h.shape[:-1], self.groups, 4), p

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize ``v [..., F]``: Gumbel straight-through when training, argmax
        otherwise."""
        logits, p = self.logits(v)
        bits = binary.bits_from_onehot(binary.choose(logits, self.training))
        codebook = self.codebook.float()
        y = bits.to(codebook.dtype) @ codebook
        return y / y.norm(dim=-1, keepdim=True).clamp_min(1e-12) * p[..., None] * self.scale.float()

    @torch.no_grad()
    def encode(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(packed codes [N, F*q/8] uint8, factor [N])`` -- deterministic (argmax)."""
        logits, p = self.logits(v)
        idx = logits.argmax(-1)
        factor = binary.decode_factor(binary.bits_from_index(idx), self.codebook, p)
        return pack_2bit(idx), factor

    @torch.no_grad()
    def decode(self, packed: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        bits = binary.bits_from_index(unpack_2bit(packed, self.groups))
        return binary.decode(bits, self.codebook.float(), factor.float(), self.scale.float())

    def code_size(self) -> int:
        """Bits per token: ``F * q`` code bits plus a 16-bit factor."""
        return self.width * self.quant_bits + 16


class ValueCodec(nn.Module):
    """One :class:`LayerValueCodec` per layer."""

    def __init__(
        self,
        num_layers: int,
        width: int,
        quant_bits: int,
        scales: dict[int, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.num_layers, self.width, self.quant_bits = num_layers, width, quant_bits
        self.layers = nn.ModuleList(
            LayerValueCodec(width, quant_bits, None if scales is None else scales[i])
            for i in range(num_layers)
        )

    def held_in(self, dtype: torch.dtype) -> ValueCodec:
        """Hold the weights in ``dtype`` (``torch.float16`` halves the codec's memory; its
        arithmetic stays float32). float16 rounding leaves SmolLM2's 2-bit codec's errors unchanged
        to 4 digits, bfloat16 breaks it (docs/benchmarks.md), so only float32 and float16 are
        taken."""
        if dtype not in (torch.float32, torch.float16):
            raise ValueError(
                f"codec dtype {dtype}: use torch.float32 or torch.float16 "
                "(bfloat16 breaks the codec)"
            )
        self.to(dtype)
        for layer in self.layers:  # a count, not a weight
            layer._buffers["step_units"] = layer.step_units.float()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What training updates: everything but ``fc1`` of layers with fixed features (whose
        ``fc2`` columns on the step units :meth:`remember_fixed` and :meth:`restore_fixed` keep)."""
        fixed = {
            id(p) for layer in self.layers if layer.fixed_features for p in layer.fc1.parameters()
        }
        return [p for p in self.parameters() if id(p) not in fixed]

    def remember_fixed(self) -> None:
        for layer in self.layers:
            layer.remember_fixed()

    def restore_fixed(self) -> None:
        for layer in self.layers:
            layer.restore_fixed()

    @classmethod
    def from_scales(
        cls, scales: dict[int, torch.Tensor], quant_bits: int, seed: int = 0
    ) -> ValueCodec:
        """A fresh codec, every layer started as a random-rotation sign quantizer."""
        layers = sorted(scales)
        if layers != list(range(len(layers))):
            raise ValueError(f"value scales for layers {layers}: expected 0..{len(layers) - 1}")
        codec = cls(len(layers), int(scales[0].numel()), quant_bits, scales)
        generator = torch.Generator().manual_seed(seed)
        for layer in codec.layers:
            layer.init_projection(generator)
        return codec

    def save(self, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Only the codec's tensors (no copy of the model) and a versioned config.json."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_path(folder / WEIGHTS) as tmp:
            save_file(state, str(tmp))
        write_json(
            folder / CONFIG,
            {
                "format": FORMAT,
                "version": VERSION,
                "commvq": __version__,
                "num_layers": self.num_layers,
                "width": self.width,
                "quant_bits": self.quant_bits,
                **(extra or {}),
            },
        )
        return folder

    @classmethod
    def load(
        cls, folder: str | Path, num_layers: int | None = None, width: int | None = None
    ) -> ValueCodec:
        """Load, checking the layer count and width against the model when given."""
        folder = Path(folder)
        path = folder / CONFIG
        if not path.is_file():
            raise FileNotFoundError(
                f"{folder}: no value codec here ({CONFIG} missing); run `commvq train-values`"
            )
        cfg = json.loads(path.read_text())
        if cfg.get("format") != FORMAT:
            raise ValueError(f"{path} is not a commvq value codec config")
        if cfg.get("version", 0) > VERSION:
            raise ValueError(f"{path} has version {cfg['version']}; upgrade commvq to read it")
        for key, want in (("num_layers", num_layers), ("width", width)):
            if want is not None and cfg[key] != want:
                raise ValueError(
                    f"{folder}: value codec for {key}={cfg[key]}, the model has {want}"
                )
        codec = cls(cfg["num_layers"], cfg["width"], cfg["quant_bits"])
        state = load_file(str(folder / WEIGHTS))
        for i in range(
            codec.num_layers
        ):  # files written before the staircase start have no step_units
            state.setdefault(f"layers.{i}.step_units", torch.zeros(()))
        codec.load_state_dict(state)
        return codec.eval()
