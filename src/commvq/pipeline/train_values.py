"""Stage `train-values`: the value codec, trained against the frozen LLM.

Per layer the attention runs with exact and with decoded values (exact keys, exact layer input);
loss = mean over layers of ``MSE(v_hat, v)/2 + MSE(attn_out(v_hat), attn_out(v))``. AdamW
(lr 1e-3, weight decay 0.1, betas 0.9/0.95), linear warmup then cosine; bf16 autocast on GPU;
packed sequences from the same corpus options as collection; checkpoints every ``save_every``
steps and ``--resume``; several processes through torchrun (disjoint corpus slices, gradients
averaged by all-reduce after each step).
Only the codec is saved (safetensors + config.json), never a copy of the model.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from commvq.codecs.value_codec import ValueCodec
from commvq.config import option, to_dict
from commvq.data.corpus import SPLITS, CorpusSource, batches, iter_documents, pack, resolve_dataset
from commvq.distributed import barrier, rank_world
from commvq.fsutil import atomic_path
from commvq.integrations.hf.loader import MODEL_DTYPES, LoadedModel, load_model
from commvq.integrations.hf.probe import LayerAttention, layer_inputs
from commvq.pipeline import progress
from commvq.pipeline.scale import load_scales

log = logging.getLogger("commvq")
STATE = "trainer_state.pt"


@dataclass(frozen=True)
class TrainValuesConfig:
    model: str = option(
        "embedded", "model (see `commvq collect --help`)", aliases=("--model_path",)
    )
    dataset: str = option("auto", "corpus (see `commvq collect --help`)")
    dataset_config: str | None = option(None, "HF dataset configuration name")
    text_field: str = option("text", "text field of .jsonl/.parquet/HF rows")
    split: str = option(
        "train", "corpus split: train, or heldout (1 document in 10, fixed)", choices=SPLITS
    )
    scale_file: Path = option(Path("data/learnable_scale.pt"), "scales from `commvq scale`")
    output_dir: Path | None = option(None, "codec folder (default: value_codec_<q>bit)")
    quant_bits: int = option(2, "bits per value channel", choices=(1, 2))
    max_seq_length: int = option(8192, "tokens per packed sequence")
    batch_size: int = option(1, "sequences per step (per process)")
    steps: int = option(1000, "optimizer steps")
    warmup_steps: int = option(100, "linear warmup steps")
    lr: float = option(1e-3, "AdamW peak learning rate")
    weight_decay: float = option(0.1, "AdamW weight decay")
    save_every: int = option(200, "steps between checkpoints")
    resume: bool = option(False, "continue from the checkpoint in output_dir")
    model_dtype: str = option(
        "auto", "compute dtype (auto: bfloat16 on GPU, float32 on CPU)", choices=MODEL_DTYPES
    )
    device: str = option("auto", "device: auto, cpu, cuda, cuda:N")
    init: str = option(
        "pca",
        "codec start: pca (transform coding on the principal axes of the first "
        "batches' values) or rotation (random-rotation sign quantizer)",
        choices=("pca", "rotation"),
    )
    init_tokens: int = option(16384, "value vectors per layer for --init pca")
    init_values: Path | None = option(
        None,
        "--init pca from these collected values (`commvq collect`'s value folder, its first "
        "--init_tokens vectors per layer) instead of forward passes over the corpus",
    )
    seed: int = option(0, "seed")
    overwrite: bool = option(False, "start over even if output_dir holds a codec")

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale_file", Path(self.scale_file))
        if self.output_dir is None:
            object.__setattr__(self, "output_dir", Path(f"value_codec_{self.quant_bits}bit"))
        object.__setattr__(self, "output_dir", Path(self.output_dir))
        if self.init_values is not None:
            object.__setattr__(self, "init_values", Path(self.init_values))
        for name in ("max_seq_length", "batch_size", "steps", "save_every", "init_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} {getattr(self, name)}: must be at least 1")
        if self.warmup_steps < 0 or self.lr <= 0:
            raise ValueError(
                f"--warmup_steps {self.warmup_steps} must be >= 0 and --lr {self.lr} positive"
            )
        if self.quant_bits not in (1, 2):
            raise ValueError(f"--quant_bits {self.quant_bits}: use 1 or 2")


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup to 1, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def check_scales(scales: dict, loaded: LoadedModel, path: Path) -> dict[int, torch.Tensor]:
    values = scales["value"]
    spec = loaded.spec
    if sorted(values) != list(range(spec.num_layers)):
        raise ValueError(
            f"{path}: value scales for {len(values)} layers, the model has {spec.num_layers}; "
            "re-run `commvq scale` on data collected with this model"
        )
    for layer, s in values.items():
        if s.numel() != spec.kv_dim:
            raise ValueError(
                f"{path}: layer {layer} scale has {s.numel()} channels, the model's values have "
                f"{spec.kv_dim}; re-run `commvq scale` on data collected with this model"
            )
    return values


def batch_stream(
    cfg: TrainValuesConfig, loaded: LoadedModel, rank: int, world: int
) -> Iterator[torch.Tensor]:
    """Packed token batches of this process's slice of the corpus, cycling through epochs."""
    tok = loaded.tokenizer
    sep = tok.eos_token_id if tok.eos_token_id is not None else 0
    src = CorpusSource(
        dataset=resolve_dataset(cfg.dataset),
        split=cfg.split,
        text_field=cfg.text_field,
        dataset_config=cfg.dataset_config,
        seed=cfg.seed,
        rank=rank,
        world=world,
    )
    for epoch in itertools.count():
        docs = (tok(d, add_special_tokens=False)["input_ids"] for d in iter_documents(src))
        seqs = (s for s in pack(docs, cfg.max_seq_length, sep) if len(s) == cfg.max_seq_length)
        n = 0
        for batch in batches(seqs, cfg.batch_size):
            n += 1
            yield batch
        if n == 0:
            raise ValueError(
                f"--dataset {cfg.dataset}: not one full sequence of {cfg.max_seq_length} tokens; "
                "lower --max_seq_length or give a larger corpus"
            )
        log.info("train-values: epoch %d of the corpus done", epoch + 1)


@torch.no_grad()
def sample_values(
    model, stream: Iterator[torch.Tensor], tokens: int, device
) -> dict[int, torch.Tensor]:
    """``[>= tokens, F]`` value vectors per layer from the first batches of ``stream``."""
    parts: dict[int, list[torch.Tensor]] = {}
    have = 0
    while have < tokens:
        batch = next(stream).to(device)
        for layer, h in enumerate(layer_inputs(model, batch)):
            v = LayerAttention(model, layer, h).v
            parts.setdefault(layer, []).append(v.reshape(-1, v.shape[-1]).float())
        have += batch.numel()
    return {layer: torch.cat(p) for layer, p in parts.items()}


def collected_values(folder: Path, spec, tokens: int) -> dict[int, torch.Tensor]:
    """The first ``tokens`` value vectors per layer of a collected value store (float32; rows with
    NaN or Inf left out), checked against the model's shapes."""
    from commvq.data.kvstore import KVStore

    try:
        store = KVStore(folder)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(
            f"--init_values {folder}: not a collected store ({e}); give `commvq collect`'s "
            "value folder (data/value)"
        ) from None
    if store.kind != "value" or store.num_layers != spec.num_layers or store.width != spec.kv_dim:
        raise ValueError(
            f"--init_values {folder}: {store.kind}s of {store.num_layers} layers x {store.width}, "
            f"the model's values are {spec.num_layers} layers x {spec.kv_dim}; give the value "
            "folder collected with this model"
        )
    out = {}
    for layer in range(spec.num_layers):
        v = store.layer(layer).read(0, min(tokens, store.num_tokens)).float()
        out[layer] = v[torch.isfinite(v).all(-1)]
    return out


def start_codec(
    cfg: TrainValuesConfig,
    loaded: LoadedModel,
    values: dict[int, torch.Tensor],
    rank: int = 0,
    world: int = 1,
) -> ValueCodec:
    """The codec training starts from (``--init``): ``--init pca`` samples the first batches of the
    ``rank``-th of ``world`` corpus slices; under torchrun every process then takes rank 0's
    codec."""
    codec = ValueCodec.from_scales(values, cfg.quant_bits, cfg.seed).to(loaded.model.device)
    if cfg.init == "pca":
        samples = (
            collected_values(cfg.init_values, loaded.spec, cfg.init_tokens)
            if cfg.init_values is not None
            else sample_values(
                loaded.model,
                batch_stream(cfg, loaded, rank, world),
                cfg.init_tokens,
                loaded.model.device,
            )
        )
        for layer, codec_layer in enumerate(codec.layers):
            codec_layer.init_from_values(samples[layer])
        # a running process group, not the recorded ``world`` eval-values rebuilds
        if rank_world()[1] > 1:
            _broadcast_params(codec)
        log.info("value codec start: the principal axes of %d values per layer", len(samples[0]))
    return codec


def step_loss(model, codec, batch: torch.Tensor, autocast) -> float:
    """Forward and backward of one batch, layer by layer (gradients accumulate); the loss value."""
    return step_losses(model, [codec], batch, autocast)[0]


@contextlib.contextmanager
def own_random_stream(streams: list | None, i: int, device: torch.device):
    """Run with the ``i``-th codec's own random stream (its training's Gumbel noise), saved back
    after, so that codecs trained together draw what each would draw alone."""
    if streams is None:
        yield
        return
    cuda = device.type == "cuda"
    torch.set_rng_state(streams[i][0])
    if cuda:
        torch.cuda.set_rng_state(streams[i][1], device)
    try:
        yield
    finally:
        streams[i] = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if cuda else None)


def step_losses(
    model, codecs: list, batch: torch.Tensor, autocast, streams: list | None = None
) -> list[float]:
    """:func:`step_loss` for several codecs on one batch: the model's forward pass and each
    layer's exact attention are computed once and shared; ``streams``: each codec's random
    stream (:func:`own_random_stream`)."""
    hidden = layer_inputs(model, batch)
    totals = [0.0] * len(codecs)
    n = len(hidden)
    for layer, h in enumerate(hidden):
        probe = LayerAttention(model, layer, h)
        for i, codec in enumerate(codecs):
            with autocast, own_random_stream(streams, i, h.device):
                v_hat = codec.layers[layer](probe.v.float())
                out_hat = probe.output(v_hat)
                loss = (
                    torch.nn.functional.mse_loss(v_hat.float(), probe.v.float()) / 2
                    + torch.nn.functional.mse_loss(out_hat.float(), probe.exact.float())
                ) / n
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"train-values: loss is {float(loss.detach())} at layer {layer}; lower --lr; "
                    "the last checkpoint is kept"
                )
            loss.backward()
            totals[i] += float(loss.detach())
    return totals


@dataclass
class _Run:
    """One codec's training: its settings, codec, optimizer, first step and loss history."""

    cfg: TrainValuesConfig
    codec: ValueCodec
    opt: torch.optim.Optimizer
    start: int
    history: list[float]


def _prepare(cfg: TrainValuesConfig, loaded: LoadedModel, rank: int, world: int) -> _Run:
    values = check_scales(load_scales(cfg.scale_file), loaded, cfg.scale_file)
    out = cfg.output_dir
    start, history, state = 0, [], None
    if (out / STATE).is_file() and not cfg.overwrite:
        if not cfg.resume:
            raise ValueError(
                f"{out} holds a value codec checkpoint: pass --resume to continue or --overwrite"
            )
        codec = ValueCodec.load(out, loaded.spec.num_layers, loaded.spec.kv_dim).to(
            loaded.model.device
        )
        state = torch.load(out / STATE, map_location=loaded.model.device, weights_only=True)
        start, history = int(state["step"]), list(state["history"])
        log.info("train-values: resuming %s at step %d", out, start)
    else:
        torch.manual_seed(cfg.seed)
        codec = start_codec(cfg, loaded, values, rank, world)
    codec.train().remember_fixed()
    opt = torch.optim.AdamW(
        codec.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95)
    )
    if state is not None:
        opt.load_state_dict(state["optimizer"])
    return _Run(cfg, codec, opt, start, history)


# settings that must agree for codecs trained together on the same batches
SHARED = (
    "model",
    "dataset",
    "dataset_config",
    "text_field",
    "split",
    "max_seq_length",
    "batch_size",
    "steps",
    "model_dtype",
    "device",
    "seed",
)


def run(cfg: TrainValuesConfig, loaded: LoadedModel | None = None) -> Path:
    return run_together([cfg], loaded)[0]


def run_together(cfgs: list[TrainValuesConfig], loaded: LoadedModel | None = None) -> list[Path]:
    """Train several value codecs (e.g. 2 and 1 bit) on the same batches, each forward pass of
    the model shared; each has its own folder, checkpoints and resume. Codecs at different steps
    (one resumed further than the other) train one after the other."""
    first = cfgs[0]
    for cfg in cfgs[1:]:
        differ = [k for k in SHARED if getattr(cfg, k) != getattr(first, k)]
        if differ:
            raise ValueError(f"codecs trained together need the same {', '.join(differ)}")
    rank, world = rank_world()
    loaded = loaded or load_model(first.model, first.model_dtype, first.device)
    runs = [_prepare(cfg, loaded, rank, world) for cfg in cfgs]
    if len({r.start for r in runs}) > 1:
        for r in runs:
            _train(r.cfg, loaded, [r], rank, world)
    else:
        _train(first, loaded, runs, rank, world)
    return [cfg.output_dir for cfg in cfgs]


def _train(cfg: TrainValuesConfig, loaded: LoadedModel, runs: list[_Run], rank: int, world: int):
    barrier()
    device = loaded.model.device
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )
    torch.manual_seed(cfg.seed)
    cuda = device.type == "cuda"
    seeded = (torch.get_rng_state(), torch.cuda.get_rng_state(device) if cuda else None)
    streams = [seeded] * len(runs) if len(runs) > 1 else None
    stream = batch_stream(cfg, loaded, rank, world)
    start = runs[0].start
    for _ in range(start):  # same data order after a resume
        next(stream)
    bar = progress.bar(
        total=cfg.steps, initial=start, desc="train-values", unit="step", disable=rank != 0
    )
    for step in range(start, cfg.steps):
        for r in runs:
            for g in r.opt.param_groups:
                g["lr"] = r.cfg.lr * lr_factor(step, r.cfg.warmup_steps, cfg.steps)
            r.opt.zero_grad(set_to_none=True)
        batch = next(stream).to(device)
        losses = step_losses(loaded.model, [r.codec for r in runs], batch, autocast, streams)
        for r, loss in zip(runs, losses, strict=True):
            if world > 1:
                _allreduce_grads(r.codec)
            r.opt.step()
            r.codec.restore_fixed()
            r.history.append(loss)
            if rank == 0 and ((step + 1) % r.cfg.save_every == 0 or step + 1 == cfg.steps):
                save_checkpoint(r.cfg, loaded, r.codec, r.opt, step + 1, r.history, world)
        bar.update(1)
        bar.set_postfix(loss=" ".join(f"{loss:.4g}" for loss in losses))
    bar.close()
    barrier()


def _allreduce_grads(codec: torch.nn.Module) -> None:
    """Average gradients over processes (the per-layer backward bypasses DDP's hooks)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    for p in codec.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def _broadcast_params(codec: torch.nn.Module) -> None:
    import torch.distributed as dist

    barrier()  # starts the process group
    for t in itertools.chain(codec.parameters(), codec.buffers()):
        dist.broadcast(t.data, 0)


def save_checkpoint(
    cfg: TrainValuesConfig,
    loaded: LoadedModel,
    codec: ValueCodec,
    opt,
    step: int,
    history: list[float],
    world: int = 1,
) -> None:
    codec.save(
        cfg.output_dir,
        {
            "model": loaded.name,
            "spec": loaded.spec.to_dict(),
            "steps_done": step,
            "train_config": to_dict(cfg),
            "world": world,
            "loss_history": history,
        },
    )
    with atomic_path(cfg.output_dir / STATE) as tmp:
        torch.save({"optimizer": opt.state_dict(), "step": step, "history": history}, tmp)
    log.info("train-values: checkpoint at step %d in %s", step, cfg.output_dir)
