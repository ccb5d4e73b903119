"""Distillation (recipe keys teacher, distill): a student fold trains towards its labels mixed with the probabilities
of its teachers' same fold on its own training images, never on its validation images; the targets are what each
trainee trains towards; a fold resumes on the targets it wrote; bad teachers are refused in one line."""

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import DEFAULTS, TINY, Interrupted, stop_after, tiny_run
from seedlings import paths
from seedlings.cli import main
from seedlings.data.folds import load_folds
from seedlings.errors import UserError
from seedlings.predict.tta import tta_predict
from seedlings.train import teacher as teacher_module
from seedlings.train.fit import train_fold
from seedlings.train.fold import eval_loader, prepare_fold
from seedlings.train.teacher import teacher_targets

MAPS = ("stages=[{size: 32, freeze: true, precompute: true, fit: logistic}, {size: 32, freeze: false, frozen_groups: "
        "1, precompute: true, lr: {max: 0.01, mult: 3}, n_cycles: 1, cycle_len: 2, cycle_mult: 1}]")  # fmt: skip
MIXING = ("mixup_alpha=0.4", "cutmix_alpha=1.0")
IMAGES = "stages=[{size: 32, freeze: false, lr: 0.01, cycle_len: 1}]"
SHAPES = {  # one SGDR stage per trainee (after a solved head, which learns the labels alone, for the maps)
    "pooled features": ("stages=[{size: 32, freeze: true, precompute: true, lr: 0.05, cycle_len: 1}]",),
    "images through the loader": (IMAGES,),
    "images made as tensors": (IMAGES, "augment=tensor"),
    "maps, mixed": (MAPS, *MIXING),
}


def final_weights(run) -> dict:
    return torch.load(run.fold_dir(0) / "final.pt", weights_only=True)


def test_distill_needs_a_teacher_and_a_teacher_a_share(demo_master, home):
    for bad in (["teacher=[t]"], ["distill=0.5"], ["teacher=[t]", "distill=1.5"]):
        with pytest.raises(UserError, match="distill"):
            tiny_run(demo_master, "bad", *bad)


def test_the_student_learns_its_teachers_fold_on_its_own_training_images(demo_master, home):
    """fold<k>/teacher.csv holds the teacher's fold-k model's probabilities (the mean of the 8 dihedral views, got
    here through another path: tta_predict on the loader's batches) of exactly fold k's training images, and the
    targets mix them with the labels by `distill`."""
    teacher = tiny_run(demo_master, "t", "precision=fp32")  # float32 forwards: compared with float32 below
    train_fold(teacher, 0)
    student = tiny_run(demo_master, "s", "teacher=[t]", "distill=0.25")
    ctx = prepare_fold(student, 0)
    targets = teacher_targets(ctx)
    written = pd.read_csv(home / "runs" / "s" / "fold0" / paths.TEACHER).set_index("file")
    folds = load_folds(demo_master, 3, 0).set_index("file")
    assert set(written.index) == set(folds.index[folds.fold != 0])  # its training images, not one validation image
    tctx = prepare_fold(teacher, 0)
    tctx.model.load_state_dict(final_weights(teacher))
    tctx.model.eval()
    rows = tctx.train_idx[:20]
    with torch.no_grad():
        expected = torch.cat([tta_predict(tctx.model, x, "d4") for x, _ in eval_loader(tctx, 40, rows)]).numpy()
    got = written.loc[[tctx.cache.files[i] for i in rows]].to_numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    one_hot = np.eye(len(ctx.classes))[ctx.labels[rows]]
    np.testing.assert_allclose(targets[rows], 0.75 * one_hot + 0.25 * got, atol=1e-6)
    assert not np.allclose(targets[rows], one_hot, atol=0.01)  # the teacher is no copy of the labels


@pytest.mark.parametrize("shape", list(SHAPES))
def test_targets_equal_to_the_labels_train_as_the_labels_do(demo_master, home, shape):
    """Each trainee trains towards the targets: a teacher file holding the one-hot labels, at distill 1, trains the
    same weights as the labels themselves; a real teacher's trains others."""
    extra = SHAPES[shape]
    plain = tiny_run(demo_master, "plain", *extra)
    train_fold(plain, 0)
    copy = tiny_run(demo_master, "copy", *extra, "teacher=[plain]", "distill=1.0")
    ctx = prepare_fold(copy, 0)
    files = [ctx.cache.files[i] for i in ctx.train_idx]
    one_hot = pd.DataFrame(np.eye(len(ctx.classes))[ctx.labels[ctx.train_idx]], columns=ctx.classes)
    copy.fold_dir(0).mkdir(parents=True)
    one_hot.insert(0, "file", files)
    one_hot.to_csv(copy.fold_dir(0) / paths.TEACHER, index=False)
    train_fold(copy, 0)
    a, b = final_weights(plain), final_weights(copy)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4)
    taught = tiny_run(demo_master, "taught", *extra, "teacher=[plain]", "distill=1.0")
    train_fold(taught, 0)
    c = final_weights(taught)
    assert any(not torch.allclose(c[k].float(), a[k].float(), atol=1e-4) for k in a if a[k].is_floating_point())


def test_a_student_resumes_on_the_targets_it_wrote(demo_master, home, monkeypatch):
    """Interrupted and resumed, or started on a teacher file written before, a student ends where one trained in one
    go ends: the teacher is not asked again, and asking it never moved the student's random numbers."""
    extra = (MAPS, *MIXING, "teacher=[t]", "distill=0.5")
    train_fold(tiny_run(demo_master, "t", "seed=1"), 0)  # another seed: preparing it draws other random numbers
    whole = tiny_run(demo_master, "whole", *extra)
    train_fold(whole, 0)
    cut = tiny_run(demo_master, "cut", *extra)
    with pytest.raises(Interrupted):
        train_fold(cut, 0, on_epoch=stop_after(1))

    def asked(*_):
        raise AssertionError("the teacher was asked again")

    monkeypatch.setattr(teacher_module, "teacher_probs", asked)
    train_fold(tiny_run(demo_master, "cut", *extra), 0)
    early = tiny_run(demo_master, "early", *extra)
    early.fold_dir(0).mkdir(parents=True)
    (early.fold_dir(0) / paths.TEACHER).write_bytes((whole.fold_dir(0) / paths.TEACHER).read_bytes())
    train_fold(early, 0)
    expected = final_weights(whole)
    for run in (cut, early):
        got = final_weights(run)
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], atol=1e-6, rtol=0)


def test_a_teacher_it_cannot_learn_from_is_refused_in_one_line(demo_master, home, capsys):
    args = ["train", "--data", str(demo_master), "--config", DEFAULTS, "--n-folds", "3", "--fold"]
    assert main([*args, "0", "--run", "t", *TINY]) == 0
    capsys.readouterr()
    cases = {
        ("1", "s", "t"): "teacher: fold 1 of run 't' is not trained (make train RUN=t FOLD=1)",
        ("0", "s", "nope"): "teacher: run 'nope' not found (train its folds first)",
        ("0", "s", "s"): "teacher: run 's' cannot teach itself",
    }
    for (fold, run, teacher), said in cases.items():
        assert main([*args, fold, "--run", run, *TINY, f"teacher=[{teacher}]", "distill=0.5"]) == 2
        err = capsys.readouterr().err
        assert said in err and len(err.strip().splitlines()) == 1, err
    assert main([*args, "0", "--run", "s", "--fold-seed", "1", *TINY, "teacher=[t]", "distill=0.5"]) == 2
    assert "teacher: run 't' does not share this run's data and folds: " in capsys.readouterr().err
