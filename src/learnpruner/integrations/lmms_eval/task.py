"""``learnpruner lmms-task``: write ShapesVQA as an offline lmms-eval task.

``learnpruner lmms-task --out DIR [--split test] [--limit N]`` writes into ``DIR``:

- ``shapesvqa.jsonl``: one record per item, ``{"id", "image", "question", "answers", "qtype"}`` (image paths
  relative to ``DIR``), the format ``learnpruner eval --data DIR/shapesvqa.jsonl`` reads, so both tools
  score the very same items;
- ``images/<id>.png``: the images (PNG, lossless: the pixels ``learnpruner eval --data shapesvqa`` generates);
- ``shapesvqa.yaml`` and ``utils.py``: the task (``dataset_path: json`` over the JSONL's absolute path),
  scored with :func:`learnpruner.evaluation.is_correct`, per question type too.

Then ``HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m lmms_eval --model learnpruner --model_args
pretrained=shapes-tiny,method=learnpruner,tokens=32 --tasks shapesvqa --include_path DIR`` runs without network.
"""

from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path

from ...commands import command

__all__ = ["write_task"]

TEMPLATE = "tasks/shapesvqa"


def _metric(name: str) -> str:
    return f"  - metric: {name}\n    aggregation: mean\n    higher_is_better: true"


def write_task(out: str | Path, split: str = "test", limit: int | None = None, name: str = "shapesvqa",
               max_new_tokens: int = 4) -> Path:
    """Write the task (JSONL, PNGs, YAML, utils.py) into ``out``; returns the YAML's path."""
    from ...testbed.shapes import SPLIT_SIZES, generate_item
    from ...utils import atomic_write

    if split not in SPLIT_SIZES:
        raise ValueError(f"--split must be one of {', '.join(SPLIT_SIZES)}, got {split!r}")
    if limit is not None and not 0 < limit <= SPLIT_SIZES[split]:
        raise ValueError(f"--limit must be in 1..{SPLIT_SIZES[split]} for the {split} split, got {limit}")
    if max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be a positive integer, got {max_new_tokens}")
    if not name or not all(c.isalnum() or c in "_-" for c in name):
        raise ValueError(f"--name must be letters, digits, '_' or '-', got {name!r}")
    folder = Path(out).resolve()
    _check_folder(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records, qtypes = [], []
    for index in range(limit or SPLIT_SIZES[split]):
        item = generate_item(split, index)
        item_id = f"{split}-{index}"
        image = f"images/{item_id}.png"
        atomic_write(folder / image, lambda tmp, im=item.image: im.save(tmp, format="PNG"))
        records.append({"id": item_id, "image": image, "question": item.question, "answers": [item.answer],
                        "qtype": item.qtype})
        qtypes.append(item.qtype)
    data = folder / f"{name}.jsonl"
    atomic_write(data, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in records)))
    template = resources.files(__package__).joinpath(TEMPLATE)
    metrics = [_metric("exact_match")] + [_metric(f"exact_match_{q}") for q in sorted(set(qtypes))]
    yaml = template.joinpath("shapesvqa.yaml.in").read_text().format(
        items=len(records), split=split, folder=folder, name=name, data=json.dumps(str(data)),
        max_new_tokens=max_new_tokens, metrics="\n".join(metrics))
    utils = template.joinpath("utils.py").read_text()
    atomic_write(folder / "utils.py", lambda tmp: Path(tmp).write_text(utils))
    path = folder / f"{name}.yaml"
    atomic_write(path, lambda tmp: Path(tmp).write_text(yaml))
    written = {f"images/{r['id']}.png" for r in records} | {data.name, "utils.py", path.name}
    old = _manifest(folder)
    manifest = {**{k: v for k, v in old.items() if (folder / k).is_file()},
                **{rel: _digest(folder / rel) for rel in sorted(written)}}
    atomic_write(folder / MANIFEST, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=0) + "\n"))
    return path


MANIFEST = ".learnpruner-task.json"  # what lmms-task wrote into the folder: relative path -> SHA-256


def _digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest(folder: Path) -> dict[str, str]:
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _check_folder(folder: Path) -> None:
    """Refuse a folder holding anything this command did not write (or wrote and someone changed since): the
    task's files would overwrite a user's own ``utils.py`` or YAML."""
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {str(folder)!r} is a file, not a folder")
    if not folder.is_dir():
        return
    manifest = _manifest(folder)
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_dir() or rel == MANIFEST:
            continue
        if rel not in manifest:
            raise ValueError(f"--out {str(folder)!r} holds {rel!r}, which learnpruner lmms-task did not write; "
                             "give a new or empty folder (or one an earlier lmms-task wrote)")
        if _digest(path) != manifest[rel]:
            raise ValueError(f"--out {str(folder)!r}: {rel!r} was changed since learnpruner lmms-task wrote it; "
                             "give a new or empty folder so your edits are not overwritten")


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder to write the task into (pass it as --include_path)")
    p.add_argument("--split", default="test", help="ShapesVQA split: test (1200 items) or val (500)")
    p.add_argument("--limit", type=int, default=None, help="first N items only")
    p.add_argument("--name", default="shapesvqa", help="task name for --tasks (default shapesvqa)")
    p.add_argument("--max-new-tokens", type=int, default=4, help="generation length (learnpruner eval's default)")


@command("lmms-task", "write ShapesVQA as an offline lmms-eval task (JSONL, PNGs, YAML, utils.py)", _args)
def _lmms_task(args: argparse.Namespace) -> int:
    path = write_task(args.out, args.split, args.limit, args.name, args.max_new_tokens)
    print(f"wrote {path} ({path.parent / (args.name + '.jsonl')}, images/, utils.py)")
    print(f"run: HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m lmms_eval --model learnpruner --model_args "
          f"pretrained=shapes-tiny,method=learnpruner,tokens=32 --tasks {args.name} --include_path {path.parent}")
    print(f"same items in learnpruner eval: learnpruner eval --model shapes-tiny --data "
          f"{path.parent / (args.name + '.jsonl')} --methods learnpruner --tokens 32")
    return 0
