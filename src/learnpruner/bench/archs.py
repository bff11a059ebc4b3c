"""Named architectures with random weights (each family's come from its benchmark view,
:class:`~learnpruner.bench.geometry.BenchFamily`), their models built fast, and benchmark views over weightless
meta-device models."""

from __future__ import annotations

import math

import torch

from .geometry import BenchFamily, bench_archs, bench_for

ARCHS = bench_archs()  # every family's named architectures (the BenchFamily subclasses in adapters/*_bench.py)


def arch_config(name: str):
    """The config of a named architecture (see :data:`ARCHS`); ``ValueError`` for an unknown one."""
    if name not in ARCHS:
        raise ValueError(f"unknown arch {name!r}; accepted: {', '.join(ARCHS)}")
    return ARCHS[name]()


def _model_class(cfg):
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    try:
        return MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(cfg)]
    except KeyError:
        raise ValueError(f"no image-text-to-text model class for {type(cfg).__name__}") from None


def _meta_model(cfg):
    """The model of ``cfg`` on the meta device: its structure and config, no weights allocated."""
    with torch.device("meta"):
        return _model_class(cfg)._from_config(cfg)


def arch_adapter(arch, kind: str | None = None) -> BenchFamily:
    """The benchmark view (:func:`~.geometry.bench_for`) of an architecture (a name from :data:`ARCHS` or a
    config) over a weightless meta-device model: its item geometry, budgets and FLOPs without allocating a single
    weight; ``kind``: the item it holds (None: the family's default). Its engine members are the adapter's."""
    return bench_for(_meta_model(arch_config(arch) if isinstance(arch, str) else arch), kind)


def _adapter(model) -> BenchFamily:
    """The benchmark view of a model, an adapter, a view, a config or an :data:`ARCHS` name (the last two over a
    meta model)."""
    from ..adapters import Adapter

    if isinstance(model, (Adapter, BenchFamily, torch.nn.Module)):
        return bench_for(model)
    return arch_adapter(model)


def build_arch(name: str, dtype=torch.float32, device="cpu", seed: int = 0):
    """The model of architecture ``name`` (see :data:`ARCHS`) with random weights, built fast.

    Weights are allocated directly on ``device`` in ``dtype`` with transformers' and torch's
    initialisers switched off, then filled once: matrices uniform with std 0.02, 1-D weights
    (norms, class embedding, LLaVA-NeXT's image newline) 1, biases 0. No download, no meta device.
    """
    from transformers.initialization import no_init_weights

    from ..adapters import adapter_for
    from ..hub import parse_dtype

    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
        dtype = torch.float32 if dtype == "auto" else dtype
    cfg = arch_config(name)
    device = torch.device(device)
    _check_fits(name, cfg, dtype, device)
    with no_init_weights(), device:
        model = _model_class(cfg)._from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    gen = torch.Generator(device=device).manual_seed(seed)
    bound = 0.02 * math.sqrt(3.0)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() >= 2:
                p.uniform_(-bound, bound, generator=gen)
            elif pname.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
    model.generation_config.pad_token_id = adapter_for(model).text_config.pad_token_id
    model._learnpruner_arch = name
    return model.eval()


def _available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_fits(name: str, cfg, dtype: torch.dtype, device: torch.device) -> None:
    """``ValueError`` before allocating when the weights alone would not fit in the device's free memory."""
    meta = _meta_model(cfg)
    need = sum(p.numel() for p in meta.parameters()) * torch.empty((), dtype=dtype).element_size()
    free = _available_bytes(device)
    if free is not None and need > 0.9 * free:
        raise ValueError(
            f"--arch {name} needs {need / 2**30:.1f} GiB for its weights in {str(dtype).replace('torch.', '')}, "
            f"but {device} has {free / 2**30:.1f} GiB free; use a GPU, --dtype bfloat16, or a smaller arch "
            f"(llava-mid, llava-next-mid, video-llava-mid)"
        )
