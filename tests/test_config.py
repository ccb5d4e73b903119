from pathlib import Path

import pytest

from seedlings.errors import UserError
from seedlings.recipe.load import load_recipe
from seedlings.recipe.schema import Recipe, Stage, lrs_of, recipe_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


# training choices a shipped recipe states itself rather than leaving to the defaults (docs/recipe.md)
STATED = ("model", "pretrained", "drop_rate", "batch_size", "optimizer", "weight_decay", "label_smoothing",
          "layer_groups", "bn_stats", "crop_scale", "precompute_d4", "tta", "stages")  # fmt: skip


@pytest.mark.parametrize("name", ["cpu.yaml", "gpu.yaml"])
def test_shipped_recipes_state_their_choices(name):
    """Each shipped recipe sets every choice that matters, and loads to exactly what its file says."""
    import yaml

    text = yaml.safe_load((CONFIGS / name).read_text())
    assert not [k for k in STATED if k not in text]
    r = recipe_dict(load_recipe(CONFIGS / name))
    for key in STATED[:-1]:
        assert r[key] == text[key], key
    assert [s["size"] for s in r["stages"]] == [s["size"] for s in text["stages"]]


def test_overrides_dotted_and_typed():
    r = load_recipe(
        CONFIGS / "cpu.yaml",
        [
            "batch_size=64",
            "stages.1.size=192",
            "stages.0.lr=1e-3",
            "stages.1.lr=[1e-4, 1e-3, 1e-3, 1e-2, 1e-2]",
            "tta=flip",
        ],
    )
    assert r.batch_size == 64 and r.stages[1].size == 192 and r.stages[0].lr == 1e-3
    assert r.stages[1].lr == [1e-4, 1e-3, 1e-3, 1e-2, 1e-2] and r.tta == "flip"
    assert r.cache_size == round(192 * r.cache_margin)


def test_folds_predict_size_and_cache():
    r = load_recipe(CONFIGS / "cpu.yaml", ["train_folds=2", "predict_size=192"])
    assert r.folds(5) == [0, 1] and r.folds(1) == [0]
    assert load_recipe(CONFIGS / "cpu.yaml", ["train_folds=0"]).folds(5) == [0, 1, 2, 3, 4]
    assert r.eval_size == 192 and r.cache_size == round(192 * r.cache_margin)  # the cache serves prediction too
    assert load_recipe(CONFIGS / "cpu.yaml", ["predict_size=0"]).eval_size == r.stages[-1].size


def test_lr_forms():
    assert lrs_of(0.1, 3) == [0.1, 0.1, 0.1]
    assert lrs_of([1.0, 2.0, 3.0], 3) == [1.0, 2.0, 3.0]
    assert lrs_of({"max": 1e-2, "mult": 10.0}, 3) == pytest.approx([1e-4, 1e-3, 1e-2])


@pytest.mark.parametrize("override,key", [
    ("bogus=1", "bogus"),
    ("stages.0.bogus=1", "stages.0.bogus"),
    ("batch_size=abc", "batch_size"),
    ("batch_size=1.5", "batch_size"),
    ("stages.0.freeze=maybe", "stages.0.freeze"),
    ("stages.5.size=10", "stages.5"),
    ("optimizer=lbfgs", "optimizer"),
    ("drop_rate=1.5", "drop_rate"),
    ("stages.1.lr=[1e-3, 1e-2]", "stages.1.lr"),
    ("stages.1.lr={max: 0.1}", "stages.1.lr"),
    ("stages.1.cycle_mult=0.5", "stages.1.cycle_mult"),
    ("stages.1.frozen_groups=0", "stages.1.precompute"),  # nothing frozen left to precompute
    ("tta=d8", "tta"),
    ("pretrained=weights.bin", "pretrained"),
    ("bn_stats=running", "bn_stats"),
    ("stages.0.fit=adam", "stages.0.fit"),
    ("stages.1.fit=logistic", "stages.1.fit"),
    ("stages.1.warmup=100", "stages.1.warmup"),
    ("stages.1.warmup=-1", "stages.1.warmup"),
    ("train_folds=-1", "train_folds"),
    ("predict_size=8", "predict_size"),
    ("head_c=-1", "head_c"),
    ("stages.0.lr={max: 1e-3, mult: 0}", "stages.0.lr.mult"),  # was a ZeroDivisionError
    ("momentum=-5", "momentum"),
    ("seed=-1", "seed"),
    ("lr_find_steps=0", "lr_find_steps"),
    ("weight_decay=-1", "weight_decay"),
    ("stages.0.size=100000", "stages.0.size"),  # OpenCV would try to allocate 39.7 GB
    ("cache_margin=50", "cache_margin"),
    ("lr_find_start=20", "lr_find_start"),
    ("stages.1.n_cycles=0", "stages.1.n_cycles"),
    ("num_workers=-2", "num_workers"),
])  # fmt: skip
def test_bad_values_name_the_key(override, key):
    with pytest.raises(UserError) as e:
        load_recipe(CONFIGS / "cpu.yaml", [override])
    assert str(e.value).startswith(key)


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_recipe(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(UserError, match="mapping"):
        load_recipe(tmp_path / "list.yaml")


@pytest.mark.parametrize(
    "text",
    ["? [a, b]\n: 1\n", "{[a]: 1}\n", "model: " + "[" * 5000 + "]" * 5000 + "\n",
     "stages: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n"],
    ids=["a list as a key", "a flow list as a key", "5000-deep brackets", "3000-deep mappings"],
)  # fmt: skip
def test_odd_yaml_is_refused_in_a_file_and_in_an_override(tmp_path, text):
    (tmp_path / "odd.yaml").write_text(text)
    with pytest.raises(UserError, match=r"odd\.yaml: (not valid YAML|nested too deeply)"):
        load_recipe(tmp_path / "odd.yaml")
    value = text.split(": ", 1)[1] if text.startswith(("model", "stages")) else text.strip()
    with pytest.raises(UserError, match="(not valid YAML|nested too deeply|expected)"):
        load_recipe(None, [f"drop_rate={value}"])


def test_quoted_words_stay_words_and_plain_exponents_are_numbers(tmp_path):
    (tmp_path / "r.yaml").write_text('teacher: ["2024"]\ndistill: 0.5\nweight_decay: 1e-3\nmodel: "1e3"\n')
    r = load_recipe(tmp_path / "r.yaml", ["drop_rate=2e-1"])
    assert r.teacher == ["2024"] and r.model == "1e3" and r.weight_decay == 1e-3 and r.drop_rate == 0.2
    with pytest.raises(UserError, match="model: expected a string, got 1000.0"):
        load_recipe(None, ["model=1e3"])  # unquoted it is a number, as YAML reads 1.5


def test_a_runs_recorded_recipe_reloads(demo_master, home, tmp_path, capsys):
    """runs/<run>/config.yaml is the resolved recipe plus the split and provenance; it loads back as a recipe file
    (`--config runs/<run>/config.yaml`, to reproduce a run) and as the run (to blend or grade it)."""
    import yaml

    from seedlings.data.folds import load_folds
    from seedlings.run import Run, saved_run

    r = load_recipe(CONFIGS / "cpu.yaml", ["seed=4"])
    run = Run("other", demo_master, r, n_folds=4, fold_seed=2)
    load_folds(demo_master, 4, 2)  # a run is recorded when its first fold trains: its folds exist then
    run.record()
    saved = yaml.safe_load(run.config_path.read_text())
    assert saved["git_commit"] and saved["data"] == str(demo_master.resolve()) and saved["n_folds"] == 4
    assert load_recipe(run.config_path) == r  # as --config: its split and provenance left out, and said
    assert "not its n_folds 4, fold_seed 2, git_commit" in capsys.readouterr().err
    split_only = {k: v for k, v in saved.items() if k != "git_commit"}  # no commit: not a run's record
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(split_only))
    with pytest.raises(UserError, match="(n_folds|data): unknown key"):
        load_recipe(tmp_path / "r.yaml")
    back = saved_run("other")
    assert (back.recipe, back.n_folds, back.fold_seed, back.data) == (r, 4, 2, demo_master.resolve())
    assert sorted(p.name for p in run.dir.iterdir()) == ["config.yaml", "data.json"]  # nothing else
    with pytest.raises(UserError, match="not found"):
        saved_run("missing")


def other_value(value):
    """A different value of the same type (validity does not matter for the key below)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    return [Stage(size=200)]


def test_each_key_role_decides_whether_the_run_refuses_a_change(demo_master):
    """A key declared to change predictions or how the pipeline runs leaves the run's training key (what a trained run
    is checked against) alone; every other key changes it."""
    import dataclasses

    from seedlings.recipe.schema import TRAINS
    from seedlings.run import Run

    base = Recipe()
    key = Run("r", demo_master, base).training_key()
    for f in dataclasses.fields(Recipe):
        changed = dataclasses.replace(base, **{f.name: other_value(getattr(base, f.name))})
        trains = f.metadata.get("role", TRAINS) == TRAINS
        assert (Run("r", demo_master, changed).training_key() != key) == trains, f.name


def test_each_stage_has_one_kind_and_the_others_are_refused():
    """A stage's kind is read from its keys in one place; each kind that trains by epochs has its trainee."""
    from seedlings.recipe.schema import BODY_ON_MAPS, HEAD_ON_FEATURES, NETWORK, SOLVED_HEAD, STAGE_KINDS, Stage
    from seedlings.train.trainees import TRAINEES

    assert Stage(freeze=True, precompute=True, fit="logistic").kind == SOLVED_HEAD
    assert Stage(freeze=True, precompute=True).kind == HEAD_ON_FEATURES
    assert Stage(freeze=True).kind == NETWORK and Stage(frozen_groups=2).kind == NETWORK
    assert Stage(precompute=True, frozen_groups=2).kind == BODY_ON_MAPS
    assert set(TRAINEES) == set(STAGE_KINDS) - {SOLVED_HEAD}  # a solved head has no epochs
    for stage, named in (
        ("{fit: logistic}", r"stages\.0\.fit: logistic needs freeze: true and precompute: true"),
        ("{fit: logistic, precompute: true}", r"stages\.0\.fit: logistic needs freeze"),
        ("{precompute: true}", r"stages\.0\.precompute: needs freeze: true or frozen_groups"),
        ("{fit: sgd}", r"stages\.0\.fit: expected sgdr or logistic, got 'sgd'"),
    ):
        with pytest.raises(UserError, match=named):
            load_recipe(None, [f"stages=[{stage}]"])


def test_the_choices_the_schema_checks_are_the_ones_each_table_implements():
    """recipe/choices.py names each choice key's values without importing their implementations: the same names."""
    from seedlings import metrics, optim
    from seedlings.data import augment, cache, loaders
    from seedlings.recipe import choices

    assert choices.TTA == tuple(augment.TTA_VIEWS) and choices.TTA_MEANS == tuple(metrics.MEANS)
    assert choices.OPTIMIZERS == tuple(optim.OPTIMIZERS) and choices.PLANT_MASKS == tuple(cache.BACKGROUND)
    assert loaders.train_transform.__defaults__ == (choices.CROP_SCALE,) == (Recipe().crop_scale,)


def test_reading_recipes_and_listing_runs_imports_neither_torch_nor_scikit_learn_nor_opencv_nor_pandas():
    """`seedlings runs` lists hundreds of runs within a second: none of the heavy libraries is imported for it."""
    import subprocess
    import sys

    heavy = "{'torch', 'sklearn', 'cv2', 'timm', 'pandas', 'numpy'}"
    code = f"import sys, seedlings.track.table; print(sorted({heavy} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_libyamls_reader_reads_what_the_strict_reader_reads_and_refuses_the_same():
    """Small texts without aliases go through libyaml (the runs table reads hundreds of configs): the same values, the
    same refusals; a text with an alias or deep flow nesting takes the strict reader."""
    import yaml

    from seedlings.recipe.load import FastStrictLoader, StrictLoader, fast, read_yaml

    config = Path(__file__).parents[1] / "configs" / "cpu.yaml"
    for text in [config.read_text(), "lr: 1e-3\nrun: '2024'\nsize: 1e3\nstages: [{size: 32}, {lr: [1, 2]}]\n"]:
        assert fast(text)
        assert yaml.load(text, FastStrictLoader) == yaml.load(text, StrictLoader)  # noqa: S506 - SafeLoaders
    assert read_yaml("lr: 1e-3\nrun: '2024'\n", "x") == {"lr": 0.001, "run": "2024"}
    for text, said in [("a: 1\na: 2\n", "given twice"), ("? [1, 2]\n: 3\n", "not a list or a mapping")]:
        assert fast(text)
        with pytest.raises(UserError, match=said):
            read_yaml(text, "x")
    assert not fast("a: &x [1]\nb: *x\n") and not fast("[" * 300 + "]" * 300) and not fast("a: 1\n" * 20000)
    with pytest.raises(UserError, match="aliases"):
        read_yaml("a: &x [1]\nb: *x\n", "x")
