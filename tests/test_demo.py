import hashlib

import numpy as np
import pytest

from seedlings.data.competition import REAL_TRAIN_COUNTS, read_image, scan_competition
from seedlings.data.demo import make_demo
from seedlings.errors import UserError


def digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


def test_layout_species_and_imbalance(demo_master):
    comp = scan_competition(demo_master)
    assert comp.classes == sorted(REAL_TRAIN_COUNTS)
    counts = np.bincount(comp.train_labels)
    assert counts.min() == 4
    assert counts.max() == round(4 * 654 / 221)  # Loose Silky-bent, the real ratio
    assert len(comp.test_files) >= 12
    lines = (demo_master / "sample_submission.csv").read_text().splitlines()
    assert lines[0] == "file,species" and len(lines) == len(comp.test_files) + 1


def test_sizes_and_modes_vary(demo_master):
    import cv2

    comp = scan_competition(demo_master)
    shapes, channels = [], set()
    for f in comp.train_files:
        raw = cv2.imread(str(comp.train_path(f)), cv2.IMREAD_UNCHANGED)
        channels.add(1 if raw.ndim == 2 else raw.shape[2])
        shapes.append(raw.shape[:2])
    sides = np.array(shapes)
    assert sides.min() < 100 and sides.max() > 200
    assert (sides[:, 0] != sides[:, 1]).any()
    assert channels == {1, 3, 4}


def test_same_seed_same_bytes(tmp_path):
    a = make_demo(tmp_path / "a", per_class=1, seed=5, max_size=120)
    b = make_demo(tmp_path / "b", per_class=1, seed=5, max_size=120)
    c = make_demo(tmp_path / "c", per_class=1, seed=6, max_size=120)
    assert digest(a) == digest(b) != digest(c)


def test_species_look_different(demo_master):
    """Mean plant colour and texture differ between species: a sanity check that there is something to learn."""
    comp = scan_competition(demo_master)
    feats = {}
    for f, y in zip(comp.train_files, comp.train_labels):
        img = read_image(comp.train_path(f)).astype(float)
        feats.setdefault(y, []).append(img.mean((0, 1)))
    means = np.array([np.mean(v, 0) for v in feats.values()])
    assert means.std(0).max() > 1.0


def test_refuses_existing_folder(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(UserError, match="already exists"):
        make_demo(tmp_path / "x", per_class=1)
