"""The image server's store: collecting objects no image references."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from fleetlib.errors import PreconditionError
from fleetlib.fstree.filter import EMPTY
from fleetlib.fstree.image import Image
from fleetlib.fstree.tree import TreeBuilder, regular
from imageserver.store import IMAGE_FILE, ImageStore

HOUR = 3600


def aged(store: ImageStore, data: bytes, seconds: float) -> bytes:
    digest = store.objects.add_bytes(data)
    then = time.time() - seconds
    os.utime(store.objects.path_of(digest), (then, then))
    return digest


def test_collects_old_orphans_only(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    store.load()
    used = aged(store, b"in an image", 5 * HOUR)
    builder = TreeBuilder()
    builder.add("/f", regular(0o644, 0, 0, 0, 11, used))
    store.add(Image("img", builder.tree, EMPTY))
    old = aged(store, b"old orphan", 5 * HOUR)
    young = aged(store, b"young orphan", 10)
    checked = aged(store, b"old but just checked", 5 * HOUR)
    store.keep_alive([checked, used])
    assert store.collect_orphans(grace=HOUR) == (1, len(b"old orphan"))
    assert sorted(store.objects) == sorted([used, young, checked])
    assert not store.objects.has(old)


def test_unreadable_image_file_stops_collection(tmp_path: Path) -> None:
    store = ImageStore(tmp_path)
    old = aged(store, b"maybe the unreadable image's", 5 * HOUR)
    broken = tmp_path / "images" / "broken" / IMAGE_FILE
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"\xff not an image")
    store.load()
    assert store.collect_orphans(grace=HOUR) == (0, 0)
    assert store.objects.has(old)


def test_an_image_naming_an_object_lost_from_disk_is_refused(tmp_path: Path) -> None:
    """An object another image holds but whose file outside damage removed is missing
    for a new image: the fetch plan may trust the references, the commit does not."""
    store = ImageStore(tmp_path)
    store.load()
    shared = store.objects.add_bytes(b"in two images")
    for name in ("first", "second"):
        builder = TreeBuilder()
        builder.add("/f", regular(0o644, 0, 0, 0, 13, shared))
        if name == "second":
            os.unlink(store.objects.path_of(shared))
            with pytest.raises(PreconditionError, match="does not hold"):
                store.add(Image(name, builder.tree, EMPTY))
        else:
            store.add(Image(name, builder.tree, EMPTY))
    assert "second" not in store.images and "first" in store.images
