import os

import numpy as np
import pytest
import torch

from seedlings.data import cache as C
from seedlings.data.competition import read_image, scan_competition
from seedlings.data.loaders import CachedImages, EpochSampler, eval_transform, make_loader, train_transform
from seedlings.errors import UserError


def test_cache_holds_resized_images_and_is_reused(demo, home):
    comp = scan_competition(demo)
    cache = C.load_cache(comp, "train", 48)
    assert cache.images.shape == (len(comp.train_files), 48, 48, 3) and cache.images.dtype == np.uint8
    i = 5
    expect = C.resize_square(read_image(comp.train_path(comp.train_files[i])), 48)
    np.testing.assert_array_equal(cache.images[i], expect)
    data_path, meta_path = C.cache_paths(comp, "train", 48)
    stamp = data_path.stat().st_mtime_ns
    C.load_cache(scan_competition(demo), "train", 48)
    assert data_path.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert len(list((home / "data" / "cache").glob("*.u8"))) == 1


def test_cache_invalidated_by_size_and_by_changed_file(demo):
    comp = scan_competition(demo)
    first, _ = C.cache_paths(comp, "train", 48)
    C.load_cache(comp, "train", 48)
    assert C.cache_paths(comp, "train", 64)[0] != first
    f = comp.train_path(comp.train_files[0])
    other = comp.train_path(comp.train_files[1])
    f.write_bytes(other.read_bytes())
    os.utime(f, ns=(1, 1))
    comp2 = scan_competition(demo)
    assert C.cache_paths(comp2, "train", 48)[0] != first
    cache = C.load_cache(comp2, "train", 48)
    np.testing.assert_array_equal(cache.images[0], cache.images[1])


def test_interrupted_build_leaves_nothing_that_looks_complete(demo, monkeypatch):
    comp = scan_competition(demo)
    real_imap = C.parallel_imap

    def interrupted(fn, items, desc, workers=None):
        for i, item in enumerate(items):
            if i == 10:
                raise KeyboardInterrupt  # Ctrl-C halfway through the build
            yield fn(item)

    monkeypatch.setattr(C, "parallel_imap", interrupted)
    with pytest.raises(KeyboardInterrupt):
        C.load_cache(comp, "train", 40)
    data_path, meta_path = C.cache_paths(comp, "train", 40)
    assert not meta_path.exists() and not data_path.exists()
    assert not list(data_path.parent.glob("*.tmp*"))
    monkeypatch.setattr(C, "parallel_imap", real_imap)
    assert C.load_cache(comp, "train", 40).images.shape[0] == len(comp.train_files)


def test_bad_image_fails_or_is_skipped(demo):
    comp = scan_competition(demo)
    bad = comp.train_path(comp.train_files[3])
    bad.write_bytes(b"")
    with pytest.raises(UserError, match=str(bad)):
        C.load_cache(comp, "train", 32)
    comp = scan_competition(demo)
    cache = C.load_cache(comp, "train", 32, skip_bad_images=True)
    assert cache.bad == [comp.train_files[3]] and cache.images[3].max() == 0


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height (its data is a few hundred bytes of zeros)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(1000))) + chunk(b"IEND", b"")
    )


def test_a_header_claiming_a_huge_image_is_one_bad_image_not_a_lost_batch(demo):
    comp = scan_competition(demo)
    bomb = comp.train_path(comp.train_files[5])
    bomb.write_bytes(png_claiming(60000, 60000))
    with pytest.raises(UserError, match=f"{bomb}: its header claims 3,600,000,000 pixels, more than 100,000,000"):
        read_image(bomb)
    with pytest.raises(UserError, match=str(bomb)):
        C.load_cache(comp, "train", 32)
    cache = C.load_cache(scan_competition(demo), "train", 32, skip_bad_images=True)
    assert cache.bad == [comp.train_files[5]] and cache.images[5].max() == 0
    assert all(cache.images[i].max() > 0 for i in range(len(cache.files)) if i != 5)  # every other photo kept


def test_loader_batches_are_reproducible_per_epoch(demo):
    comp = scan_competition(demo)
    cache = C.load_cache(comp, "train", 64)
    labels = np.array(comp.train_labels)
    ds = CachedImages(cache.images, np.arange(len(labels)), labels, train_transform(48, (0.5,) * 3, (0.5,) * 3))

    def first_batch(epoch, workers):
        sampler = EpochSampler(len(ds), seed=1, fold=0)
        sampler.set_epoch(epoch)
        loader = make_loader(ds, 8, torch.device("cpu"), sampler, num_workers=workers)
        return next(iter(loader))

    x0, y0 = first_batch(0, 0)
    assert x0.shape == (8, 3, 48, 48) and x0.dtype == torch.float32
    assert -1.01 <= x0.min() and x0.max() <= 1.01
    x0b, y0b = first_batch(0, 2)  # worker processes give the same batch
    assert torch.equal(x0, x0b) and torch.equal(y0, y0b)
    x1, _ = first_batch(1, 0)
    assert not torch.equal(x0, x1)


def test_eval_transform_is_deterministic_resize(demo):
    comp = scan_competition(demo)
    cache = C.load_cache(comp, "test", 40)
    ds = CachedImages(cache.images, np.arange(len(comp.test_files)), None, eval_transform(32, (0.5,) * 3, (0.5,) * 3))
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and y == -1
    assert torch.equal(ds[0][0], x)
