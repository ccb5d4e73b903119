import cv2
import numpy as np
import pytest
from PIL import Image

from seedlings.data.competition import check_competition, read_image, scan_competition
from seedlings.errors import UserError


@pytest.fixture
def rgb():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)


def test_rgb_png_round_trip(tmp_path, rgb):
    p = tmp_path / "a.png"
    cv2.imwrite(str(p), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    out = read_image(p)
    assert out.dtype == np.uint8 and out.shape == (20, 30, 3)
    np.testing.assert_array_equal(out, rgb)


def test_rgba_drops_alpha(tmp_path, rgb):
    p = tmp_path / "a.png"
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)]), "RGBA").save(p)
    np.testing.assert_array_equal(read_image(p), rgb)


def test_greyscale_becomes_rgb(tmp_path, rgb):
    p = tmp_path / "g.png"
    Image.fromarray(rgb[:, :, 0], "L").save(p)
    out = read_image(p)
    assert out.shape == (20, 30, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], rgb[:, :, 0])


def test_sixteen_bit_scaled_to_uint8(tmp_path):
    p = tmp_path / "d.png"
    img16 = np.array([[0, 257 * 100, 65535]], np.uint16)
    cv2.imwrite(str(p), img16)
    out = read_image(p)
    assert out.dtype == np.uint8
    assert out[0, :, 0].tolist() == [0, 100, 255]


def test_palette_png(tmp_path, rgb):
    p = tmp_path / "p.png"
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(p)
    expect = np.asarray(Image.open(p).convert("RGB"))
    np.testing.assert_array_equal(read_image(p), expect)


def test_jpeg(tmp_path, rgb):
    p = tmp_path / "a.jpg"
    Image.fromarray(rgb).save(p, quality=95)
    assert read_image(p).shape == (20, 30, 3)


@pytest.mark.parametrize(
    "content,why",
    [
        (b"", "empty file"),
        (b"not an image at all", "not a readable image"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 20, "not a readable image"),
    ],
)
def test_bad_files_name_the_file(tmp_path, content, why):
    p = tmp_path / "bad.png"
    p.write_bytes(content)
    with pytest.raises(UserError, match=why) as e:
        read_image(p)
    assert str(p) in str(e.value)


def test_scan_ignores_stray_files(demo):
    (demo / "train" / "Maize" / ".DS_Store").write_bytes(b"x")
    (demo / "train" / "Maize" / "Thumbs.db").write_bytes(b"x")
    (demo / "test" / "Thumbs.db").write_bytes(b"x")
    comp = scan_competition(demo)
    assert not any("DS_Store" in f or "Thumbs" in f for f in comp.train_files + comp.test_files)


def test_check_competition_reports_and_fails_on_bad(demo):
    report = check_competition(demo)
    assert sum(report.counts.values()) == len(scan_competition(demo).train_files)
    assert report.bad == [] and min(report.widths) >= 20
    bad = sorted((demo / "train" / "Charlock").iterdir())[0]
    bad.write_bytes(b"")
    with pytest.raises(UserError, match=str(bad)):
        check_competition(demo)
    report = check_competition(demo, skip_bad_images=True)
    assert len(report.bad) == 1 and str(bad) in report.bad[0]


def test_check_competition_finds_duplicates(demo):
    src = sorted((demo / "train" / "Maize").iterdir())[0]
    (demo / "train" / "Maize" / "copy.png").write_bytes(src.read_bytes())
    report = check_competition(demo)
    assert any(len(g) == 2 and "train/Maize/copy.png" in g for g in report.duplicates)


def test_missing_folders_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        scan_competition(tmp_path / "nope")
    (tmp_path / "c").mkdir()
    with pytest.raises(UserError, match="train"):
        scan_competition(tmp_path / "c")
