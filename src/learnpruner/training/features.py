"""The feature cache: what the frozen VLM computes before stage 1, computed once and reused by every step.

The VLM is frozen while an LPM trains, so every record's vision features (the adapter's ``encode`` output: the rows
at the vision feature layer, before the projector) and its tokenized prompt are the same in every epoch and every
run. :func:`build_cache` computes them once, in record order, into a folder of safetensors shards; a training run
then reads them (:class:`FeatureCache`) instead of rendering, processing and encoding each image again.

A cache folder holds ``index.json`` (what it was built from: the model's fingerprint, the data's identity, the
records it covers, the storage dtype) and ``shard-NNNNN.safetensors`` files of :data:`SHARD` records each: per
record its ``input_ids``, ``labels``, feature rows ``[n, d]``, placeholder ``slots``, and where the family has them its
crops, patches, side streams (Qwen3-VL's DeepStack) and small visual inputs (Qwen's ``image_grid_thw``). Shards and
the index are written atomically, so an interrupted build resumes at its last whole shard, and a run never reads
half a shard. Features are stored in float16 by default (half the disk; the LPM sees rows rounded to 11 bits of
mantissa, far below what changes a ranking) or float32. Every file is read as data only (safetensors, JSON).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..adapters import Adapter
from ..engine.layout import VisualFeatures
from ..utils import atomic_write
from .data import SkipRecord, _collate, _encode

logger = logging.getLogger("learnpruner.training")

__all__ = ["FeatureCache", "build_cache", "SHARD", "CACHE_FORMAT"]

CACHE_FORMAT = "learnpruner-features"
CACHE_VERSION = 2  # 2: records hold each token's grid coordinates
SHARD = 256  # records per shard
INDEX = "index.json"
STRUCTURE = "structure.safetensors"
DTYPES = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def _read_index(folder: Path) -> dict | None:
    path = folder / INDEX
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete the folder to rebuild the feature cache") from None
    if not isinstance(index, dict) or index.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path} is not a learnpruner feature cache (format {CACHE_FORMAT!r}); pass an empty or "
                         "new folder to --features")
    return index


def _write_index(folder: Path, index: dict) -> None:
    atomic_write(folder / INDEX, lambda tmp: Path(tmp).write_text(json.dumps(index, indent=1) + "\n"))


def _item_tensors(visual: VisualFeatures, j: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Item ``j`` of an encoded batch as named tensors (rows in ``dtype``, indices as int64)."""
    feats = visual.features[j]
    def own(x: torch.Tensor, to: torch.dtype) -> torch.Tensor:  # a copy of its own (items may share storage)
        return x.detach().to("cpu", to).clone().contiguous()

    out = {"features": own(feats, dtype), "slots": own(visual.slots[j], torch.int64)}
    if visual.crops is not None:
        out["crops"] = own(visual.crops[j], torch.int64)
    if visual.patches is not None:
        out["patches"] = own(visual.patches[j], torch.int64)
    if visual.coords is not None:
        out["coords"] = own(visual.coords[j], torch.float32)
    for s, stream in enumerate(visual.streams or []):
        out[f"stream{s}"] = own(stream[j], dtype)
    return out


def _side_inputs(ad: Adapter, visual: dict) -> dict[str, torch.Tensor]:
    """A record's visual inputs that are not pixels (Qwen's ``image_grid_thw``, ...), as the processor gave them."""
    return {f"in.{name}": visual[name].detach().to("cpu").contiguous() for name in ad.visual_inputs
            if not name.startswith("pixel_values") and isinstance(visual.get(name), torch.Tensor)}


@torch.no_grad()
def build_cache(folder: str | os.PathLike, model, processor, data, records: int, max_length: int = 2048,
                dtype: str = "float16", batch_size: int = 16, identity: dict | None = None,
                progress: bool = True) -> FeatureCache:
    """Compute (or finish computing) the feature cache of the first ``records`` records of ``data`` in ``folder``.

    ``data``: a :class:`~learnpruner.training.JsonlRecords` or :class:`~learnpruner.training.ShapesRecords`; bad
    records are skipped and counted (as training skips them). ``identity``: what the cache is of (the model's
    fingerprint and the data's identity; checked when the folder already holds a cache, so a cache is never reused
    for another model or other data). Resumes after the last whole shard. Returns the opened cache.
    """
    from tqdm.auto import tqdm

    from ..adapters import adapter_for
    from ..hub import model_fingerprint

    if dtype not in DTYPES:
        raise ValueError(f"feature cache dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if isinstance(records, bool) or not isinstance(records, int) or records <= 0:
        raise ValueError(f"records must be a positive integer, got {records!r}")
    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--features {str(out)!r} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    ad = adapter_for(model)
    identity = identity or {**model_fingerprint(model), **data.identity}
    index = _read_index(out)
    if index is None:
        stray = sorted(p.name for p in out.iterdir() if not p.name.startswith((".", "val-")))
        if stray:
            raise ValueError(f"--features {str(out)!r} is not empty and holds no feature cache ({', '.join(stray[:3])}"
                             f"{' ...' if len(stray) > 3 else ''}): pass an empty or new folder")
        index = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "identity": identity, "dtype": dtype,
                 "family": ad.family, "max_length": max_length, "shard": SHARD, "records": 0, "shards": [],
                 "skipped": {}}
    else:
        _check_identity(index, identity, dtype, max_length, out)
    if index["records"] >= records:
        return FeatureCache(out)
    device = next(model.parameters()).device
    pad_id = processor.tokenizer.pad_token_id or 0
    bar = tqdm(total=records, initial=index["records"], desc="feature cache", disable=not progress,
               dynamic_ncols=True, unit="record")
    structure_saved = (out / STRUCTURE).is_file()
    try:
        while index["records"] < records:
            start = index["records"]
            stop = min(records, start + SHARD)
            tensors: dict[str, torch.Tensor] = {}
            kept: list[int] = []
            skipped = dict(index["skipped"])
            for chunk in range(start, stop, batch_size):
                encoded, where = [], []
                for r in range(chunk, min(stop, chunk + batch_size)):
                    ex = data.get(r)
                    if ex is None:
                        continue
                    try:
                        encoded.append(_encode(ex, processor, ad, max_length))
                        where.append(r)
                    except SkipRecord as e:
                        data.skip(r, str(e))
                for reason, count in data.skipped.items():
                    skipped[reason] = count
                if not encoded:
                    continue
                batch = {k: v.to(device) for k, v in _collate(encoded, pad_id).items()}
                inputs = {k: batch[k].to(model.dtype) if batch[k].is_floating_point() else batch[k]
                          for k in ad.visual_inputs if k in batch}
                visual = ad.encode(inputs.pop("pixel_values", None), input_ids=batch["input_ids"], **inputs)
                if visual.num_images != len(encoded):
                    raise ValueError(f"the feature cache holds one image or video per record; records "
                                     f"{where[0]}..{where[-1]} gave {visual.num_images} items for {len(encoded)}")
                if visual.structure is not None and not structure_saved:
                    save_file({"structure": visual.structure.detach().to("cpu", torch.float32).contiguous()},
                              str(out / STRUCTURE))
                    structure_saved = True
                if isinstance(visual.features, torch.Tensor):
                    visual.features = list(visual.features)
                for j, (r, enc) in enumerate(zip(where, encoded)):
                    tensors[f"{r}.input_ids"] = torch.tensor(enc.input_ids, dtype=torch.int64)
                    tensors[f"{r}.labels"] = torch.tensor(enc.labels, dtype=torch.int64)
                    tensors.update({f"{r}.{k}": v for k, v in _item_tensors(visual, j, DTYPES[dtype]).items()})
                    tensors.update({f"{r}.{k}": v for k, v in _side_inputs(ad, enc.visual).items()})
                    kept.append(r)
                bar.update(min(stop, chunk + batch_size) - chunk)
            name = _shard_name(len(index["shards"]))
            if tensors:
                atomic_write(out / name, lambda tmp, t=tensors: save_file(t, tmp, metadata={"format": CACHE_FORMAT}))
            index["shards"].append({"file": name if tensors else None, "first": start, "stop": stop, "kept": kept})
            index["records"] = stop
            index["skipped"] = skipped
            _write_index(out, index)
    finally:
        bar.close()
    return FeatureCache(out)


def _check_identity(index: dict, identity: dict, dtype: str, max_length: int, out: Path) -> None:
    if index.get("version") != CACHE_VERSION:
        raise ValueError(f"the feature cache in {out} has version {index.get('version')!r}, this learnpruner writes "
                         f"version {CACHE_VERSION} (it adds each token's grid coordinates): pass another --features "
                         "folder (or delete this one to rebuild it)")
    saved = index.get("identity", {})
    differ = {k: (saved.get(k), v) for k, v in identity.items() if saved.get(k) != v}
    if differ:
        shown = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in differ.items())
        raise ValueError(f"the feature cache in {out} was built for another model or other data ({shown}); pass "
                         "another --features folder (or delete this one to rebuild it)")
    for key, now in (("dtype", dtype), ("max_length", max_length)):
        if index.get(key) != now:
            raise ValueError(f"the feature cache in {out} was built with {key}={index.get(key)!r}, this run asks "
                             f"{key}={now!r}; pass another --features folder or the cache's setting")


@dataclass
class CachedBatch:
    """A training batch read from the cache: the token tensors (``input_ids``, ``labels``, ``attention_mask`` and any
    side visual inputs, right-padded) and the items' :class:`VisualFeatures`."""

    batch: dict[str, torch.Tensor]
    visual: VisualFeatures


class FeatureCache:
    """A feature cache folder opened for reading (see the module docstring); ``len`` is its usable records."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = _read_index(self.folder)
        if index is None:
            raise FileNotFoundError(f"no feature cache in {self.folder} (no {INDEX})")
        self.index = index
        self.identity = index["identity"]
        self.records = [r for s in index["shards"] for r in s["kept"]]
        self._shard_of = {r: s["file"] for s in index["shards"] for r in s["kept"]}
        self._handles: dict[str, object] = {}
        structure = self.folder / STRUCTURE
        self.structure = None
        if structure.is_file():
            with safe_open(str(structure), framework="pt") as f:
                self.structure = f.get_tensor("structure")

    def __len__(self) -> int:
        return len(self.records)

    @property
    def skipped(self) -> dict:
        return dict(self.index.get("skipped", {}))

    def _handle(self, name: str):
        if name not in self._handles:
            self._handles[name] = safe_open(str(self.folder / name), framework="pt")
        return self._handles[name]

    def record(self, r: int) -> dict[str, torch.Tensor]:
        """Every tensor of record ``r`` (its number in the data), by name."""
        f = self._handle(self._shard_of[r])
        prefix = f"{r}."
        return {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}

    def batch(self, records: list[int], pad_id: int, device, dtype: torch.dtype) -> CachedBatch:
        """Records ``records`` as one right-padded batch on ``device`` (feature rows in ``dtype``)."""
        recs = [self.record(r) for r in records]
        width = max(int(x["input_ids"].shape[0]) for x in recs)
        b = len(recs)
        input_ids = torch.full((b, width), pad_id, dtype=torch.long)
        labels = torch.full((b, width), -100, dtype=torch.long)
        mask = torch.zeros((b, width), dtype=torch.long)
        for i, x in enumerate(recs):
            n = x["input_ids"].shape[0]
            input_ids[i, :n], labels[i, :n], mask[i, :n] = x["input_ids"], x["labels"], 1
        batch = {"input_ids": input_ids.to(device), "labels": labels.to(device), "attention_mask": mask.to(device)}
        for name in dict.fromkeys(k for x in recs for k in x if k.startswith("in.")):
            values = [(x[name], x["input_ids"].shape[0]) for x in recs if name in x]
            if all(v.dim() == 2 and v.shape[1] == n for v, n in values):  # one value per token: padded as tokens
                values = [torch.nn.functional.pad(v, (0, width - n)) for v, n in values]
            else:
                values = [v for v, _ in values]
            batch[name[3:]] = torch.cat(values).to(device)
        feats = [x["features"].to(device, dtype) for x in recs]
        same = all(f.shape == feats[0].shape for f in feats)
        streams = sorted(k for k in recs[0] if k.startswith("stream"))
        visual = VisualFeatures(
            features=torch.stack(feats) if same else feats,
            slots=[x["slots"].to(device) for x in recs],
            structure=None if self.structure is None else self.structure.to(device, dtype),
            crops=[x["crops"].to(device) for x in recs] if "crops" in recs[0] else None,
            patches=[x["patches"].to(device) for x in recs] if "patches" in recs[0] else None,
            coords=[x["coords"].to(device) for x in recs] if "coords" in recs[0] else None,
            streams=[[x[s].to(device, dtype) for x in recs] for s in streams] or None,
        )
        return CachedBatch(batch, visual)
