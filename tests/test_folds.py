import pandas as pd
import pytest

from seedlings.data.folds import load_folds, make_folds
from seedlings.errors import UserError


def test_stratified_disjoint_and_deterministic(demo, tmp_path):
    a = make_folds(demo, n_folds=3, seed=0, out=tmp_path / "a.csv")
    b = make_folds(demo, n_folds=3, seed=0, out=tmp_path / "b.csv")
    assert a.read_bytes() == b.read_bytes()
    df = pd.read_csv(a)
    assert list(df.columns) == ["file", "species", "fold"]
    assert df.file.is_unique and set(df.fold) == {0, 1, 2}
    counts = pd.crosstab(df.species, df.fold)
    assert (counts.max(axis=1) - counts.min(axis=1)).max() <= 1
    assert (df.file.str.split("/").str[0] == df.species).all()
    c = make_folds(demo, n_folds=3, seed=1, out=tmp_path / "c.csv")
    assert c.read_bytes() != a.read_bytes()


def test_real_data_balanced(real, tmp_path):
    df = pd.read_csv(make_folds(real, n_folds=5, seed=0, out=tmp_path / "r.csv"))
    assert len(df) == 1388
    counts = pd.crosstab(df.species, df.fold)
    assert (counts.max(axis=1) - counts.min(axis=1)).max() <= 1


def test_duplicates_share_a_fold(demo, tmp_path):
    for species in ("Maize", "Charlock", "Fat Hen"):
        files = sorted((demo / "train" / species).iterdir())
        for i, src in enumerate(files[:3]):
            (demo / "train" / species / f"dup{i}.png").write_bytes(src.read_bytes())
    df = pd.read_csv(make_folds(demo, n_folds=3, seed=0, out=tmp_path / "f.csv")).set_index("file")
    for species in ("Maize", "Charlock", "Fat Hen"):
        files = sorted((demo / "train" / species).iterdir())
        originals = [f for f in files if not f.name.startswith("dup")][:3]
        for i, src in enumerate(originals):
            assert df.loc[f"{species}/dup{i}.png", "fold"] == df.loc[f"{species}/{src.name}", "fold"]


def test_default_path_rerun_and_param_change(demo, home, capsys):
    out = make_folds(demo, n_folds=3, seed=0)
    assert out.parent == home / "data" / "folds" and out.name.startswith("comp-") and out.name.endswith("-k3-s0.csv")
    mtime = out.stat().st_mtime_ns
    make_folds(demo, n_folds=3, seed=0)
    assert "up to date" in capsys.readouterr().out and out.stat().st_mtime_ns == mtime
    with pytest.raises(UserError, match="other parameters"):
        make_folds(demo, n_folds=4, seed=0, out=out)
    make_folds(demo, n_folds=4, seed=0, out=out, force=True)
    assert pd.read_csv(out).fold.max() == 3


def test_mismatched_folds_file_is_an_error(demo):
    out = make_folds(demo, n_folds=3, seed=0)
    df = pd.read_csv(out)
    df.iloc[:-1].to_csv(out, index=False)
    with pytest.raises(UserError, match="does not match"):
        load_folds(demo, 3, 0)


def test_load_folds_creates_and_orders(demo):
    df = load_folds(demo, 3, 0)
    from seedlings.data.competition import scan_competition

    assert df.file.tolist() == scan_competition(demo).train_files


def test_too_many_folds(demo):
    with pytest.raises(UserError, match="n-folds"):
        make_folds(demo, n_folds=50, seed=0)
