"""``learnpruner train`` (an LPM or learnpruner-set's module for a frozen VLM) and ``learnpruner calibrate``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..commands import command
from ..options import parse_list


def _train_args(p: argparse.ArgumentParser) -> None:
    from ..training import TrainConfig

    d = TrainConfig()
    p.add_argument("--model", required=True,
                   help="hub id, local folder or built-in name of the (frozen) VLM, any supported family (LLaVA-1.5, "
                   "LLaVA-NeXT: the LPM trains on every crop; Video-LLaVA: images and videos); its processor needs a "
                   "chat template")
    p.add_argument("--data", required=True, help="LLaVA-format JSON/JSONL file, or 'shapesvqa' for the testbed stream")
    p.add_argument("--image-folder", default=None, help="folder the records' image (and video) paths are relative to")
    p.add_argument("--frames", type=int, default=8,
                   help="frames sampled uniformly from each record's video (Video-LLaVA: 8; needs PyAV)")
    p.add_argument("--tokens", type=int, default=d.tokens, help="target budget (average visual tokens per layer)")
    p.add_argument("--out", required=True, help="output folder: lpm.safetensors, lpm.json, checkpoint.pt")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--ratio-weight", type=float, default=d.ratio_weight, help="weight of the keep-ratio loss")
    p.add_argument("--mask", choices=("threshold", "topk"), default=d.mask,
                   help="training forward keeps p > 0.5 (threshold) or exactly the top r1 per image (topk)")
    p.add_argument("--distill-weight", type=float, default=d.distill_weight,
                   help="weight of KL distillation toward the unpruned model (0: off)")
    p.add_argument("--stage2", action="store_true",
                   help="run stage 2 (the text-attention drop in the LLM) in the training forward, as inference does")
    p.add_argument("--layer", type=int, default=None,
                   help="stage-2 layer K of the schedules trained for (default: the method's, round(12 L / 32)); "
                   "the LPM ships it, so `apply` uses it unless given another")
    p.add_argument("--budget-range", default=None, metavar="LO,HI",
                   help="sample each step's budget log-uniformly in [LO, HI] tokens (one LPM for every budget); "
                   "default: always --tokens")
    p.add_argument("--hidden-dim", type=int, default=d.hidden_dim, help="LPM hidden width")
    p.add_argument("--max-length", type=int, default=d.max_length,
                   help="longest training sequence in tokens, image placeholders included; longer records are "
                   "skipped (LLaVA-NeXT: a 672x672 image alone takes 2928, use 4096)")
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--bf16", action="store_true", help="bfloat16 model and autocast (GPU)")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (7B-class LLMs)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt exactly")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in OUT (deletes its lpm.*, checkpoint.pt first); without it or --resume "
                   "a non-empty OUT is refused")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: accelerate's choice)")
    p.add_argument("--features", default=None, metavar="DIR",
                   help="feature cache: the frozen VLM's vision features and tokenized prompts of --records records, "
                   "computed once into DIR (resumable) and read by every step instead of encoding each image again")
    p.add_argument("--records", type=int, default=None,
                   help="records the feature cache holds (the run cycles over them; default: every record of a "
                   "LLaVA-format file; required for the shapesvqa stream)")
    p.add_argument("--dropped-rows", type=int, default=d.dropped_rows,
                   help="run the LLM on the text, the kept rows and this many of each image's dropped rows (their "
                   "gradient scaled to stay unbiased); default: every row")
    p.add_argument("--val", default=None, metavar="DATA",
                   help="validation records for the curve: shapesvqa:val, shapesvqa:val-large or a LLaVA-format file "
                   "(cached beside --features); the saved LPM is the best point of the curve")
    p.add_argument("--val-every", type=int, default=250, help="steps between points of the validation curve")
    p.add_argument("--clip-grad", type=float, default=d.clip_grad, help="clip the LPM's gradient to this norm")
    p.add_argument("--method", default=d.method,
                   help="the method whose stage-1 module is trained: learnpruner or lpm-only (the paper's LPM, "
                   "straight-through estimator) or learnpruner-set (its quality term and gamma, REINFORCE on the "
                   "answer loss)")
    p.add_argument("--tau", type=float, default=d.tau, help="learnpruner-set: the policy's temperature")
    p.add_argument("--policy-samples", type=int, default=d.policy_samples,
                   help="learnpruner-set: sets drawn per record (leave-one-out baseline; at least 2)")
    p.add_argument("--gamma", type=float, default=d.gamma,
                   help="learnpruner-set: the start of the learned position weight gamma (> 0)")
    p.add_argument("--gamma-grid", default=None, metavar="G1,G2,...",
                   help="learnpruner-set: first fit gamma on the answer loss of --gamma-records cached training "
                   "records over these values (needs --features)")
    p.add_argument("--gamma-records", type=int, default=d.gamma_records,
                   help="learnpruner-set: training records the gamma fit scores")


@command("train", "train a Learnable Pruning Module for a frozen VLM (runs under `accelerate launch` too)",
         _train_args)
def _train(args: argparse.Namespace) -> int:
    import learnpruner

    from ..hub import load
    from ..training import JsonlRecords, ShapesRecords, TrainConfig, check_out_dir, train_lpm

    for name in ("steps", "batch_size", "tokens", "hidden_dim", "ckpt_every", "max_length", "frames", "val_every"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    for name, low, what in (("records", 1, "a positive"), ("dropped_rows", 0, "a non-negative")):
        if getattr(args, name) is not None and getattr(args, name) < low:
            raise ValueError(f"--{name.replace('_', '-')} must be {what} integer, got {getattr(args, name)}")
    if (args.records is not None or args.val is not None) and args.features is None:
        raise ValueError("--records and --val need --features DIR (the feature cache they are read from)")
    if args.features is not None and args.data == "shapesvqa" and args.records is None:
        raise ValueError("--features on the shapesvqa stream needs --records N (how many records to cache; the "
                         "stream is endless)")
    method = learnpruner.get_method(args.method)
    if not method.needs_lpm:
        trainable = ", ".join(m for m in sorted(learnpruner.METHODS) if learnpruner.get_method(m).needs_lpm)
        raise ValueError(f"--method {args.method!r} has no learned stage-1 module to train; accepted: {trainable}")
    if method.stage1 == "coverage":
        if args.policy_samples < 2:
            raise ValueError(f"--policy-samples must be at least 2 (the leave-one-out baseline), got "
                             f"{args.policy_samples}")
        for name in ("tau", "gamma"):
            if not getattr(args, name) > 0:
                raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
        if args.stage2 or args.dropped_rows is not None:
            raise ValueError("--method learnpruner-set trains stage 1 alone, the LLM on the kept rows only: drop "
                             "--stage2 and --dropped-rows")
    gamma_grid = None
    if args.gamma_grid is not None:
        if method.stage1 != "coverage" or args.features is None:
            raise ValueError("--gamma-grid is for --method learnpruner-set with --features (it scores cached records)")
        gamma_grid = tuple(parse_list(args.gamma_grid, float, "--gamma-grid", unique=True))
        if not all(g > 0 for g in gamma_grid):
            raise ValueError(f"--gamma-grid takes positive values, got {args.gamma_grid!r}")
    budget_range = None
    if args.budget_range is not None:
        budget_range = tuple(parse_list(args.budget_range, int, "--budget-range"))
        if len(budget_range) != 2 or not 0 < budget_range[0] <= budget_range[1]:
            raise ValueError(f"--budget-range takes LO,HI with 0 < LO <= HI, got {args.budget_range!r}")
    check_out_dir(args.out, args.resume, args.overwrite)  # refuse a used --out before loading anything
    data = (ShapesRecords(args.seed) if args.data == "shapesvqa"
            else JsonlRecords(args.data, args.image_folder, num_frames=args.frames))
    val_data = _val_records(args.val, args.frames) if args.val is not None else None
    model, processor = load(args.model, device=args.device or "cpu", dtype="bfloat16" if args.bf16 else "float32")
    cfg = TrainConfig(tokens=args.tokens, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      ratio_weight=args.ratio_weight, mask=args.mask, distill_weight=args.distill_weight,
                      hidden_dim=args.hidden_dim, ckpt_every=args.ckpt_every, seed=args.seed, bf16=args.bf16,
                      grad_ckpt=args.grad_ckpt, max_length=args.max_length, budget_range=budget_range,
                      stage2=args.stage2, layer=args.layer, dropped_rows=args.dropped_rows, clip_grad=args.clip_grad,
                      val_every=args.val_every if val_data is not None else 0, method=method.name, tau=args.tau,
                      policy_samples=args.policy_samples, gamma=args.gamma, gamma_grid=gamma_grid,
                      gamma_records=args.gamma_records)
    features = val = None
    if args.features is not None:
        from ..training.features import build_cache

        records = args.records if args.records is not None else len(data)
        features = build_cache(args.features, model, processor, data, records, max_length=cfg.max_length)
        if val_data is not None:
            folder = Path(args.features) / ("val-" + "".join(c if c.isalnum() else "-" for c in args.val)[-60:])
            val = build_cache(folder, model, processor, val_data, len(val_data), max_length=cfg.max_length)
    train_lpm(model, processor, data, args.out, cfg, resume=args.resume, device=args.device,
              overwrite=args.overwrite, features=features, val=val)
    if int(os.environ.get("RANK", "0")) == 0:  # one report, not one per process under torchrun/accelerate
        if data.skipped:
            print(f"skipped {sum(data.skipped.values())} bad record(s): {data.skipped}")
        print(f"LPM written to {args.out}")
    return 0


def _val_records(spec: str, frames: int):
    """The validation records of ``--val``: a ShapesVQA split or a LLaVA-format file."""
    from ..training import JsonlRecords, ShapesRecords

    if spec.startswith("shapesvqa:"):
        return ShapesRecords(split=spec.partition(":")[2])
    if not Path(spec).is_file():
        raise FileNotFoundError(f"--val {spec!r}: not shapesvqa:val, shapesvqa:val-large nor a LLaVA-format file")
    return JsonlRecords(spec, num_frames=frames)



def _calibrate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="hub id, local folder or built-in name (shapes-tiny, shapes-tiny-full, tiny-random-llava)")
    p.add_argument("--lpm", default=None, help="LPM folder to calibrate (default: the model's own learnpruner-lpm/)")
    p.add_argument("--out", required=True,
                   help="folder for the calibrated LPM (a copy of --lpm with the thresholds in its lpm.json); new or "
                   "empty, or --lpm itself to calibrate your own LPM in place (a shipped LPM is never overwritten)")
    p.add_argument("--data", default="shapesvqa-val",
                   help="validation data: 'shapesvqa-val' (the ShapesVQA validation split) or a JSONL of records")
    p.add_argument("--tokens", default="192,128,64,32", help="comma-separated budgets to calibrate")
    p.add_argument("--limit", type=int, default=None, help="first N items only")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")


@command("calibrate", "calibrate an LPM's adaptive-budget thresholds on validation data (budget='adaptive')",
         _calibrate_args)
def _calibrate(args: argparse.Namespace) -> int:
    from ..adaptive import calibrate, save_thresholds
    from ..evaluation import EvalItem, load_items
    from ..hub import format_prompt, load
    from ..lpm import LearnablePruningModule

    tokens = parse_list(args.tokens, int, "--tokens")
    if any(t <= 0 for t in tokens) or args.batch_size <= 0:
        raise ValueError(f"--tokens and --batch-size must be positive integers, got {args.tokens!r} and "
                         f"{args.batch_size}")
    if args.data == "shapesvqa":
        raise ValueError("--data 'shapesvqa' is the ShapesVQA test split; calibrate on validation data: "
                         "'shapesvqa-val' or a JSONL of records")
    if args.data != "shapesvqa-val" and not os.path.isfile(args.data):
        raise FileNotFoundError(f"no data at {args.data!r}: pass 'shapesvqa-val' (the ShapesVQA validation split) "
                                "or a JSONL file of records")
    if args.lpm is not None:
        _check_calibrate_out(Path(args.lpm), Path(args.out))
    if args.data == "shapesvqa-val":
        from ..testbed.shapes import load_split

        split = load_split("val", args.limit)
        items = [EvalItem(f"val-{it.index}", it.image, it.question, [it.answer]) for it in split]
    else:
        items = load_items(args.data, args.limit)
    model, processor = load(args.model, device=args.device)
    folder = Path(args.lpm) if args.lpm else Path(model.config._name_or_path) / "learnpruner-lpm"
    _check_calibrate_out(folder, Path(args.out))
    lpm = LearnablePruningModule.load(folder).to(args.device).eval()

    def batches():
        for start in range(0, len(items), args.batch_size):
            chunk = items[start:start + args.batch_size]
            texts = [format_prompt(processor, it.question) for it in chunk]
            yield processor(images=[it.pil() for it in chunk], text=texts, return_tensors="pt", padding=True)

    thresholds = calibrate(model, lpm, batches(), tokens)
    out = Path(args.out)
    if out.resolve() != folder.resolve():
        from ..utils import atomic_write

        for name in ("lpm.safetensors", "lpm.json"):
            atomic_write(out / name, lambda tmp, name=name: Path(tmp).write_bytes((folder / name).read_bytes()))
    path = save_thresholds(out, thresholds)
    for t, v in thresholds.items():
        print(f"tokens={t}: keep-probability threshold {v:.4f}")
    print(f"{len(items)} items; thresholds written to {path}")
    return 0


def _check_calibrate_out(lpm: Path, out: Path) -> None:
    """``--out`` of calibrate: never inside the installed package; new, empty, or the (user's own) ``--lpm``."""
    from ..utils import refuse_package_path

    refuse_package_path(out, "--out")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and out.resolve() != lpm.resolve():
        raise ValueError(f"--out {str(out)!r} is not empty; give a new or empty folder, or --lpm's own folder to "
                         "calibrate that LPM in place")
