import io
import json
import os
import stat
import zipfile
from pathlib import Path

import pytest

from seedlings.data import fetch as F
from seedlings.data import kaggle as K
from seedlings.errors import UserError


def zip_folder(folder: Path, nested: bool) -> bytes:
    """The competition bundle as Kaggle has shipped it: flat folders, or train.zip/test.zip inside the zip."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as outer:
        if nested:
            for part in ("train", "test"):
                inner = io.BytesIO()
                with zipfile.ZipFile(inner, "w") as z:
                    for p in sorted((folder / part).rglob("*")):
                        if p.is_file():
                            z.write(p, str(p.relative_to(folder)))
                outer.writestr(f"{part}.zip", inner.getvalue())
            inner = io.BytesIO()
            with zipfile.ZipFile(inner, "w") as z:
                z.write(folder / "sample_submission.csv", "sample_submission.csv")
            outer.writestr("sample_submission.csv.zip", inner.getvalue())
        else:
            for p in sorted(folder.rglob("*")):
                if p.is_file() and p.name != "answers.csv":
                    outer.write(p, str(p.relative_to(folder)))
    return buf.getvalue()


class FakeKaggle:
    def __init__(self, payload: bytes | None = None, error: BaseException | None = None):
        self.payload, self.error, self.calls = payload, error, 0

    def download(self, dest: Path) -> None:
        self.calls += 1
        if self.error:
            raise K.explain_kaggle_error(self.error)
        dest.mkdir(parents=True, exist_ok=True)
        (dest / f"{K.COMPETITION}.zip").write_bytes(self.payload)


@pytest.mark.parametrize("nested", [True, False])
def test_fetch_extracts_verifies_and_skips_second_time(demo, tmp_path, home, nested, capsys):
    client = FakeKaggle(zip_folder(demo, nested))
    out = F.fetch(tmp_path / "comp-fetched", client=client)
    assert (out / "train" / "Maize").is_dir() and (out / "sample_submission.csv").is_file()
    manifest = json.loads((out / "MANIFEST.json").read_text())
    n_train = len(list((demo / "train").rglob("*.png")))
    assert manifest["counts"]["train"] == n_train
    assert len(manifest["files"]["sample_submission.csv"]["sha256"]) == 64
    assert "warning" in capsys.readouterr().err  # not the real competition's 4,750 / 794
    F.fetch(out, client=client)
    assert client.calls == 1 and "nothing to do" in capsys.readouterr().out
    assert (home / "data" / "raw").is_dir()


def test_fetch_from_archive(demo, tmp_path):
    archive = tmp_path / "bundle.zip"
    archive.write_bytes(zip_folder(demo, nested=True))
    out = F.fetch(tmp_path / "by-hand", archive=archive)
    assert F.is_verified(out)


def malicious(kind: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("train/Maize/ok.png", b"x")
        if kind == "dotdot":
            z.writestr("../escaped.txt", b"gotcha")
        elif kind == "absolute":
            z.writestr("/tmp/escaped-abs.txt", b"gotcha")
        elif kind == "link":
            info = zipfile.ZipInfo("train/Maize/link.png")
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            z.writestr(info, "/etc/passwd")
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "link"])
def test_malicious_zip_is_refused_and_writes_nothing(tmp_path, kind):
    target = tmp_path / "sub" / "comp"
    target.parent.mkdir()
    with pytest.raises(UserError, match="refusing"):
        F.fetch(target, client=FakeKaggle(malicious(kind)))
    assert not target.exists()
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "sub" / "escaped.txt").exists()
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == []


def test_corrupt_image_in_bundle_fails_and_leaves_no_folder(demo, tmp_path):
    sorted((demo / "train" / "Maize").iterdir())[0].write_bytes(b"broken")
    with pytest.raises(UserError, match="not a readable image"):
        F.fetch(tmp_path / "c", client=FakeKaggle(zip_folder(demo, nested=False)))
    assert not (tmp_path / "c").exists()


def test_no_credentials(monkeypatch, tmp_path):
    for k in ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "nokaggle"))
    with pytest.raises(UserError, match="kaggle.json") as e:
        F.fetch(tmp_path / "c")
    assert "KAGGLE_USERNAME" in str(e.value) and "KAGGLE_KEY" in str(e.value)


def test_loose_kaggle_json_warns_without_printing_key(monkeypatch, tmp_path, capsys):
    for k in ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path))
    f = tmp_path / "kaggle.json"
    f.write_text('{"username": "me", "key": "s3cr3tkey"}')
    os.chmod(f, 0o644)
    assert K.credentials_source() == str(f)
    err = capsys.readouterr().err
    assert "chmod 600" in err and "s3cr3tkey" not in err


class HTTPError(Exception):
    def __init__(self, status):
        super().__init__(f"{status} Client Error: for url https://www.kaggle.com/api/v1/...")
        self.response = type("R", (), {"status_code": status})()


@pytest.mark.parametrize("error,expect", [
    (HTTPError(403), "https://www.kaggle.com/competitions/plant-seedlings-classification/rules"),
    (HTTPError(401), "credentials"),
    (ConnectionError("Failed to establish a new connection"), "network"),
    (TimeoutError("timed out"), "network"),
])  # fmt: skip
def test_kaggle_errors_are_one_clear_line(tmp_path, error, expect):
    with pytest.raises(UserError, match=expect.replace(".", r"\.")) as e:
        F.fetch(tmp_path / "c", client=FakeKaggle(error=error))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "c").exists()


def test_kaggle_cli_starts(tmp_path):
    """kaggle 2.2.5 imports six without declaring it: the CLI must start in the project's environment."""
    import subprocess
    import sys

    kaggle = Path(sys.executable).parent / "kaggle"
    r = subprocess.run(
        [str(kaggle), "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "KAGGLE_CONFIG_DIR": str(tmp_path)},
    )
    assert "ModuleNotFoundError" not in r.stderr
    assert "2.2.5" in r.stdout + r.stderr


def test_real_client_maps_the_kaggle_packages_own_objects(tmp_path, capsys):
    """RealKaggle against the kaggle package offline: its calls bind to KaggleApi's real signatures, and the
    package's ApiSubmission objects (enum status, string scores, None while pending) become leaderboard rows."""
    import inspect

    from kaggle.api.kaggle_api_extended import KaggleApi
    from kagglesdk.competitions.types.competition_api_service import ApiSubmission

    from seedlings.data.kaggle import RealKaggle, leaderboard

    scored = {"date": "2026-11-27T10:00:00Z", "description": "cpu: OOF 0.91", "status": "COMPLETE"}
    scored |= {"publicScore": "0.97103", "privateScore": "0.96852"}
    pending = {"date": "2026-11-27T11:00:00Z", "description": "gpu", "status": "PENDING"}
    calls = []

    class Api:  # records each call after checking it binds to the real method's signature
        def __getattr__(self, name):
            def call(*args, **kwargs):
                bound = inspect.signature(getattr(KaggleApi, name)).bind(None, *args, **kwargs)
                calls.append((name, bound.arguments["competition"]))
                return [ApiSubmission.from_dict(scored), None, ApiSubmission.from_dict(pending)]

            return call

    client = object.__new__(RealKaggle)  # no authentication: the boundary is the api object
    client.api = Api()
    client.submit(tmp_path / "s.csv", "message")
    client.competition = "another-competition"  # --competition: every call names it
    client.download(tmp_path / "dl")
    rows = leaderboard(client)
    assert calls == [("competition_submit", "plant-seedlings-classification"),
                     ("competition_download_files", "another-competition"),
                     ("competition_submissions", "another-competition")]  # fmt: skip
    assert [(r["status"], r["public_score"], r["private_score"]) for r in rows] == [
        ("complete", "0.97103", "0.96852"),
        ("pending", "", ""),
    ]
    assert "complete    public 0.97103   private 0.96852   cpu: OOF 0.91" in capsys.readouterr().out
