"""Shared fixtures: an isolated SEEDLINGS_HOME per test and small generated competitions."""

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from glob import glob
from pathlib import Path

import pytest

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "seedlings-150"


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    """Folds, caches, runs and submissions of each test go to its own folder, never the repo's data/."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("SEEDLINGS_HOME", str(h))
    return h


@pytest.fixture(scope="session")
def demo_master(tmp_path_factory) -> Path:
    from seedlings.data.demo import make_demo

    return make_demo(tmp_path_factory.mktemp("demo") / "comp", per_class=4, seed=3, max_size=300)


@pytest.fixture
def demo(demo_master, tmp_path) -> Path:
    """A private copy of a tiny demo competition (about 90 train images), free to modify."""
    dst = tmp_path / "comp"
    shutil.copytree(demo_master, dst)
    return dst


@pytest.fixture
def data(demo) -> Path:
    """The demo without its answers: a sweep then skips the held-out grade after its search (that is make compare's
    job, and minutes)."""
    (demo / "answers.csv").unlink()
    return demo


@pytest.fixture
def real() -> Path:
    """The shared folder of real seedling photos (never copied into the repo); tests that need it skip without it."""
    if not REAL.is_dir():
        pytest.skip("../shared/data/seedlings-150 is not here")
    return REAL


TINY = [
    "model=test_efficientnet",
    "pretrained=none",
    "bn_stats=batch",  # no pretrained statistics to keep
    "train_folds=0",  # every fold (the CLI's default recipe, configs/cpu.yaml, trains two)
    "crop_scale=0.35",
    "optimizer=sgd",  # the tests were tuned on the defaults of their time: SGD, L2 1e-4, 8 dihedral features
    "weight_decay=1e-4",
    "precompute_d4=true",
    "batch_size=16",
    "num_workers=0",
    "drop_rate=0.1",
    "layer_groups=3",  # the CLI's default recipe cuts Lite2 into 5 and masks and mixes its images: not here
    "plant_mask=none",
    "mixup_alpha=0",
    "cutmix_alpha=0",
    "stages=[{size: 32, freeze: true, precompute: true, lr: 0.05, n_cycles: 1, cycle_len: 1, cycle_mult: 1},"
    " {size: 32, freeze: false, lr: [0.001, 0.003, 0.01], n_cycles: 2, cycle_len: 1, cycle_mult: 2},"
    " {size: 40, freeze: false, lr: {max: 0.01, mult: 3}, n_cycles: 2, cycle_len: 1, cycle_mult: 1}]",
    "tta=flip",
]


DEFAULTS = str(Path(__file__).with_name("defaults.yaml"))  # --config for the CLI: the recipe defaults


def tiny_recipe(*extra):
    from seedlings.recipe.load import load_recipe

    return load_recipe(None, [*TINY, *extra])


def tiny_run(data, name: str = "tiny", *extra: str, n_folds: int = 3):
    """A run of the tiny recipe (with `extra` overrides) on `data`, opened as the CLI opens one."""
    from seedlings.run import open_run

    return open_run(name, data, tiny_recipe(*extra), n_folds)


class Interrupted(Exception):
    """Raised by stop_after's hook: a fold stopped from inside, as a kill would stop it, checkpoint written."""


def stop_after(rows: int):
    """An on_epoch hook for train_fold that raises Interrupted after that many SGDR epochs."""
    seen = []

    def hook(row: dict) -> None:
        seen.append(row)
        if len(seen) == rows:
            raise Interrupted

    return hook


@contextlib.contextmanager
def seedlings_home(path: Path):
    """SEEDLINGS_HOME set to `path` for a block (a fixture wider than one test, which `home` cannot serve)."""
    old = os.environ.get("SEEDLINGS_HOME")
    os.environ["SEEDLINGS_HOME"] = str(path)
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop("SEEDLINGS_HOME")
        else:
            os.environ["SEEDLINGS_HOME"] = old


@pytest.fixture(scope="session")
def trained_fold(demo_master, tmp_path_factory):
    """One fold of the tiny recipe trained once per session on the demo (3 folds): shared by several tests."""
    import math

    import numpy as np

    from seedlings.data.folds import load_folds

    home = tmp_path_factory.mktemp("trained-home")
    with seedlings_home(home):
        from seedlings.train.fit import train_fold

        run = tiny_run(demo_master)
        recipe = run.recipe
        final = train_fold(run, 0)
        n_train = int((load_folds(demo_master, 3, 0).fold != 0).sum())
    steps = [math.ceil(n_train * (8 if s.precompute else 1) / recipe.batch_size) for s in recipe.stages]
    assert n_train % recipe.batch_size != 0  # the test wants a short last batch
    return {
        "recipe": recipe,
        "run": run,
        "final": final,
        "home": home,
        "dir": home / "runs" / "tiny" / "fold0",
        "steps_per_epoch": steps,
        "n_train": n_train,
        "np": np,
    }


# ------------------------------------------------------------------------------------------------------ PostgreSQL
def server_binaries() -> Path | None:
    found = sorted(glob("/usr/lib/postgresql/*/bin/initdb")) or [shutil.which("initdb")]
    return Path(found[-1]).parent if found[-1] else None


class Postgres:
    """A throwaway PostgreSQL cluster on a unix socket, run by an unprivileged user (the Debian package's `postgres`
    when the tests run as root). .ci/run installs the server package when it is missing."""

    def __init__(self, bins: Path):
        self.bins = bins
        self.folder = Path(tempfile.mkdtemp(prefix="pg", dir="/tmp"))  # short: a unix socket path has about 100 bytes
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.folder, user.pw_uid, user.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.pgdata = self.folder / "data"
        self.url = f"postgresql://postgres@/optuna?host={self.folder}"

    def pg(self, *cmd):
        subprocess.run([*self.as_user, *cmd], check=True, capture_output=True, timeout=60)

    def create(self) -> None:
        self.pg(str(self.bins / "initdb"), "-D", str(self.pgdata), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self.start()
        self.pg(str(self.bins / "createdb"), "-h", str(self.folder), "-U", "postgres", "optuna")

    def start(self) -> None:
        options = f"-k {self.folder} -c listen_addresses='' -F -c max_connections=50"
        self.pg(str(self.bins / "pg_ctl"), "-D", str(self.pgdata), "-o", options, "-w", "-l", str(self.folder / "log"),
                "start")  # fmt: skip

    def stop(self) -> None:
        """As a crash: no checkpoint, every connection cut."""
        subprocess.run([*self.as_user, str(self.bins / "pg_ctl"), "-D", str(self.pgdata), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)  # fmt: skip


@pytest.fixture
def postgres_server():
    bins = server_binaries()
    if bins is None:
        pytest.skip("PostgreSQL server binaries not installed (.ci/run installs Debian's postgresql)")
    server = Postgres(bins)
    try:
        server.create()
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.folder, ignore_errors=True)


@pytest.fixture
def postgres(postgres_server):
    return postgres_server.url


# ----------------------------------------------------------------------------------------------------------- Slurm
@pytest.fixture
def slurm_cluster():
    """A one-node Slurm cluster of its own: a munge daemon with a fresh key, slurmctld and slurmd on free ports with
    their state under a temporary folder, this machine the node; removed afterwards. The environment to use it
    (SLURM_CONF) is yielded. .ci/run installs Debian's slurmctld, slurmd and munge when they are missing."""
    from seedlings.storage import loopback_port

    if not all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch", "sinfo")):
        pytest.skip("Slurm not installed (.ci/run installs Debian's slurmctld, slurmd and munge)")
    if os.geteuid() != 0:
        pytest.skip("slurmd runs as root")
    folder = Path(tempfile.mkdtemp(prefix="sl", dir="/tmp"))
    (folder / "state").mkdir()
    (folder / "spool").mkdir()
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    sock = folder / "munge.sock"
    munged = ["munged", "-f", f"--socket={sock}", f"--key-file={key}", f"--log-file={folder / 'munged.log'}",
              f"--pid-file={folder / 'munged.pid'}", f"--seed-file={folder / 'munged.seed'}"]  # fmt: skip
    subprocess.run(munged, check=True, capture_output=True, timeout=30)
    host = socket.gethostname().split(".")[0]
    conf = folder / "slurm.conf"
    conf.write_text(f"""ClusterName=seedlings-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={loopback_port()}
SlurmdPort={loopback_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
StateSaveLocation={folder / "state"}
SlurmdSpoolDir={folder / "spool"}
SlurmctldPidFile={folder / "slurmctld.pid"}
SlurmdPidFile={folder / "slurmd.pid"}
SlurmctldLogFile={folder / "slurmctld.log"}
SlurmdLogFile={folder / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory=1000 State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    daemons = []
    try:
        for cmd in (["slurmctld", "-D", "-i", "-f", str(conf)], ["slurmd", "-D", "-f", str(conf)]):
            daemons.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(1)
        deadline = time.time() + 60
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True).stdout
            if state.strip() == "idle":
                break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"the test cluster never came up: {(folder / 'slurmctld.log').read_text()[-2000:]}")
        yield env
    finally:
        for d in daemons:
            d.terminate()
        for d in daemons:
            d.wait(timeout=30)
        subprocess.run(["munged", "-s", f"--socket={sock}"], capture_output=True, timeout=30)
        shutil.rmtree(folder, ignore_errors=True)
