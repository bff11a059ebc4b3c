"""Issue "Trust", training side: checkpoints are read as data only, a used --out is not overwritten
silently, written files honour the umask, and an interrupted run resumes."""

from __future__ import annotations

import os
import random
import stat

import numpy as np
import pytest
import torch

import learnpruner
from learnpruner import cli
from learnpruner.testbed.model import build_model, build_processor
from learnpruner.training import ShapesRecords, TrainConfig, iter_history, train_lpm
from learnpruner.utils import atomic_torch_save, atomic_write, rng_state, set_rng_state
from recipes.testbed import train as tb

torch.set_num_threads(1)


class _Payload:
    """Unpickling this runs ``os.mkdir(marker)``: what a crafted checkpoint could do with any function."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _crafted_checkpoint(path, marker) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": {}, "stage": "b", "step": 1, "model": _Payload(marker)}, path)


@pytest.fixture(scope="module")
def processor():
    return build_processor()


def _model(processor):
    return build_model(processor.tokenizer, tiny=True, seed=0).eval()


def _cfg(**kw):
    base = dict(tokens=64, steps=4, batch_size=2, lr=3e-3, warmup=1, ckpt_every=2, hidden_dim=16, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def _tb_cfg(out, **kw) -> tb.TestbedConfig:
    kw = {"lr_vision_b": 0.0, "steps_b": 3, "warmup": 1, **kw}
    return tb.TestbedConfig(out=str(out), steps_a=2, batch_size_a=2, batch_size=2, ckpt_every=1,
                          eval_every=100, eval_n=2, test_n=2, tiny=True, seed=1, **kw)


# ------------------------------------------------------------------------------------------------ 1. data only


def test_lpm_resume_reads_a_crafted_checkpoint_as_data_only(processor, tmp_path):
    run, marker = tmp_path / "run", tmp_path / "payload-ran"
    _crafted_checkpoint(run / "checkpoint.pt", marker)
    with pytest.raises(ValueError, match="not a loadable learnpruner checkpoint") as e:
        train_lpm(_model(processor), processor, ShapesRecords(), run, _cfg(), resume=True, progress=False)
    assert str(run / "checkpoint.pt") in str(e.value) and "nothing from it was executed" in str(e.value)
    with pytest.raises(ValueError, match="not a loadable learnpruner checkpoint"):
        list(iter_history(run))
    assert not marker.exists()


def test_testbed_resume_and_vision_from_read_a_crafted_checkpoint_as_data_only(tmp_path):
    src, marker = tmp_path / "src", tmp_path / "payload-ran"
    _crafted_checkpoint(src / "checkpoint.pt", marker)
    tr = tb.Trainer(_tb_cfg(src))
    with pytest.raises(ValueError, match="not a loadable learnpruner checkpoint") as e:
        tr.load_checkpoint()  # what --resume does
    assert str(src / "checkpoint.pt") in str(e.value)
    with pytest.raises(ValueError, match="not a loadable learnpruner checkpoint"):
        tb.Trainer(_tb_cfg(tmp_path / "dst", vision_from=str(src)))
    assert not marker.exists()


def test_rng_state_survives_a_weights_only_round_trip(tmp_path):
    random.seed(3)
    np.random.seed(4)
    np.random.standard_normal()  # a cached Gaussian is part of NumPy's state
    torch.manual_seed(5)
    atomic_torch_save({"rng": rng_state()}, tmp_path / "ck.pt")
    want = (random.random(), np.random.standard_normal(), np.random.rand(), torch.rand(3))
    set_rng_state(torch.load(tmp_path / "ck.pt", weights_only=True)["rng"])
    got = (random.random(), np.random.standard_normal(), np.random.rand(), torch.rand(3))
    assert got[:3] == want[:3] and torch.equal(got[3], want[3])


# ------------------------------------------------------------------------------------------------ 2. used --out


def test_train_refuses_a_used_out_folder_unless_overwrite(processor, tmp_path, capsys):
    out = tmp_path / "run"
    train_lpm(_model(processor), processor, ShapesRecords(), out, _cfg(steps=2), progress=False)
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"lpm.json", "lpm.safetensors", "checkpoint.pt"} <= set(before)

    with pytest.raises(ValueError, match="--overwrite") as e:
        train_lpm(_model(processor), processor, ShapesRecords(), out, _cfg(steps=2), progress=False)
    assert str(out) in str(e.value)
    # the command line refuses too, before loading the model
    rc = cli.main(["train", "--model", "tiny-random-llava", "--data", "shapesvqa", "--out", str(out),
                   "--steps", "1", "--batch-size", "1", "--hidden-dim", "8", "--device", "cpu"])
    assert rc == 2 and str(out) in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing touched

    # --overwrite clears the old run's files first: an interrupted new run leaves no old lpm.* behind
    train_lpm(_model(processor), processor, ShapesRecords(), out, _cfg(steps=2), progress=False,
              overwrite=True, stop_after=1)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "notes.txt"]
    assert [h["step"] for h in iter_history(out)] == [1]
    with pytest.raises(ValueError, match="--resume"):
        train_lpm(_model(processor), processor, ShapesRecords(), out, _cfg(steps=2), resume=True, overwrite=True,
                  progress=False)


def test_testbed_train_refuses_a_used_out_folder_unless_overwrite(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("checkpoint.pt", "metrics.json", "model.safetensors", "config.json", "notes.txt"):
        (out / name).write_text("old")
    with pytest.raises(ValueError, match="--overwrite") as e:
        tb.train(_tb_cfg(out), progress=False)
    assert str(out) in str(e.value)
    assert len(list(out.iterdir())) == 5

    ran = []
    monkeypatch.setattr(tb.Trainer, "__init__", lambda self, cfg: ran.append(sorted(os.listdir(cfg.out))))
    monkeypatch.setattr(tb.Trainer, "run", lambda self, progress=True: {})
    monkeypatch.setattr(tb.Trainer, "close", lambda self: None)
    tb.train(_tb_cfg(out), progress=False, overwrite=True)
    assert ran == [["notes.txt"]]  # the old run's files were gone before training started


# ------------------------------------------------------------------------------------------------ 3. umask


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "a.txt", lambda tmp: open(tmp, "w").close())
        lpm = learnpruner.LearnablePruningModule(learnpruner.LPMConfig(feature_dim=4, hidden_dim=2))
        lpm.save(tmp_path / "lpm")
    finally:
        os.umask(old)
    for path in (tmp_path / "a.txt", tmp_path / "lpm" / "lpm.safetensors", tmp_path / "lpm" / "lpm.json"):
        assert stat.S_IMODE(path.stat().st_mode) == mode, path


# ------------------------------------------------------------------------------------------------ 4. Ctrl-C


def test_interrupted_run_keeps_a_whole_checkpoint_and_resumes_exactly(processor, tmp_path, monkeypatch):
    """Regression check (this already held): Ctrl-C during a step or during a checkpoint write leaves the
    last whole checkpoint and no temporary file; --resume then ends with the uninterrupted run's weights."""
    from learnpruner.training import loop as lpm_train

    full = train_lpm(_model(processor), processor, ShapesRecords(), tmp_path / "a", _cfg(), progress=False)
    real_save, calls = torch.save, []

    def interrupted_save(obj, f, *a, **kw):  # the second checkpoint write is cut off halfway
        calls.append(f)
        if len(calls) == 2:
            open(f, "wb").write(b"half a checkpoint")
            raise KeyboardInterrupt
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        train_lpm(_model(processor), processor, ShapesRecords(), tmp_path / "b", _cfg(), progress=False)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["checkpoint.pt"]
    assert [h["step"] for h in iter_history(tmp_path / "b")] == [1, 2]

    real_step, steps = lpm_train.step_loss, []

    def interrupted_step(*a, **kw):  # Ctrl-C in the middle of step 4
        steps.append(1)
        if len(steps) == 2:
            raise KeyboardInterrupt
        return real_step(*a, **kw)

    monkeypatch.setattr(lpm_train, "step_loss", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        train_lpm(_model(processor), processor, ShapesRecords(), tmp_path / "b", _cfg(), resume=True, progress=False)
    monkeypatch.setattr(lpm_train, "step_loss", real_step)
    resumed = train_lpm(_model(processor), processor, ShapesRecords(), tmp_path / "b", _cfg(), resume=True,
                        progress=False)
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k


def test_testbed_init_from_starts_stage_b_from_a_saved_model(tmp_path):
    """``--init-from`` fine-tunes a saved model: stage (b) from its every weight, stage (a) skipped."""
    from learnpruner.testbed.model import save

    processor = build_processor()
    source = build_model(processor.tokenizer, tiny=True, seed=7)
    save(source, processor, str(tmp_path / "src"))
    trainer = tb.Trainer(_tb_cfg(tmp_path / "run", init_from=str(tmp_path / "src")))
    assert trainer.stage == "b" and trainer.step == 0
    assert trainer.history[0]["init_from"] == str((tmp_path / "src").resolve())
    for (k, a), (_, b) in zip(trainer.model.state_dict().items(), source.state_dict().items()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match=r"--init-from .* no saved model \(config.json\)"):
        tb.Trainer(_tb_cfg(tmp_path / "run2", init_from=str(tmp_path)))
    with pytest.raises(ValueError, match=r"--vision-from .* and --init-from .* both set the starting weights"):
        tb.Trainer(_tb_cfg(tmp_path / "run3", init_from=str(tmp_path / "src"), vision_from=str(tmp_path / "src")))
    bigger = build_model(processor.tokenizer, tiny=False, seed=7)
    save(bigger, processor, str(tmp_path / "big"))
    with pytest.raises(ValueError, match=r"is not this testbed architecture"):
        tb.Trainer(_tb_cfg(tmp_path / "run4", init_from=str(tmp_path / "big")))


def test_train_never_writes_into_the_installed_package(capsys):
    """--out naming a shipped LPM folder is refused before anything is deleted, with --overwrite too (calibrate
    refuses the same); the shipped LPM keeps its bytes."""
    from learnpruner.hub import BUILTIN_MODELS

    shipped = BUILTIN_MODELS["shapes-tiny"] / "learnpruner-lpm"
    before = {p.name: p.read_bytes() for p in shipped.iterdir()}
    for extra in ([], ["--overwrite"], ["--resume"]):
        rc = cli.main(["train", "--model", "shapes-tiny", "--data", "shapesvqa", "--steps", "1", "--out", str(shipped),
                       *extra])
        assert rc == 2
        err = capsys.readouterr().err
        assert "lies inside the installed learnpruner package" in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in shipped.iterdir()} == before


def test_the_tokenizer_aligns_with_a_processor_that_writes_text_around_an_item():
    """InternVL's processor writes ``<img>`` ... ``</img>`` around an image's placeholders: those ids are skipped;
    any other difference between the tokenizer and the processor skips the record."""
    import pytest

    from learnpruner.training.data import SkipRecord, _align

    ids = [1, 5, 90, 7, 7, 7, 91, 6, 2]  # <s> a <img> ctx ctx ctx </img> b </s>
    placeholder = [t == 7 for t in ids]
    collapsed, where = [1, 5, 90, 7, 91, 6, 2], [0, 1, 2, 3, 6, 7, 8]
    assert _align([1, 5, 7, 6, 2], collapsed, where, placeholder) == [0, 1, 3, 7, 8]
    with pytest.raises(SkipRecord, match="tokenizer and processor disagree"):
        _align([1, 4, 7, 6, 2], collapsed, where, placeholder)  # a text token differs
    with pytest.raises(SkipRecord, match="tokenizer and processor disagree"):
        _align([1, 5, 7, 6, 2, 3], collapsed, where, placeholder)  # the tokenizer has more
