"""The image server's journal (identity, ordered events, tombstones, a follower's
position) and the store's use of it: names bound to one content forever, quarantine,
and healing a crash between an image file and its journal row."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from fleetlib.errors import ExistsError
from fleetlib.fstree.filter import EMPTY
from fleetlib.fstree.image import Image
from fleetlib.fstree.tree import TreeBuilder, regular
from fleetlib.signing import manifest_digest
from fleetlib.sql.engine import open_engine
from fleetlib.wire import imageserver_pb2
from fleetlib.wire.codec import image_to_proto
from imageserver.journal import ADDED, DELETED, EXPIRY_CHANGED, Journal, Position, peek
from imageserver.store import IMAGE_FILE, JOURNAL, ImageStore

Kind = imageserver_pb2.JournalEvent


def opened(folder: Path) -> ImageStore:
    store = ImageStore(folder)
    store.load()
    return store


def image(store: ImageStore, name: str, *contents: bytes) -> Image:
    builder = TreeBuilder()
    for index, data in enumerate(contents):
        builder.add(f"/f{index}", regular(0o644, 0, 0, 0, len(data),
                                          store.objects.add_bytes(data)))
    return Image(name, builder.tree, EMPTY)


def kinds(journal: Journal) -> list[tuple[int, str]]:
    return [(event.kind, event.entry.name) for event in journal.events_after(0)]


def test_identity_is_made_once_and_each_open_is_a_new_generation(tmp_path: Path) -> None:
    url = str(tmp_path / JOURNAL)
    first = Journal(open_engine(url))
    again = Journal(open_engine(url))
    assert again.identity.id == first.identity.id and len(first.identity.id) == 32
    assert (first.identity.generation, again.identity.generation) == (1, 2)
    assert Journal(open_engine(str(tmp_path / "other.sqlite"))).identity.id != first.identity.id
    assert Journal(open_engine(str(tmp_path / "given.sqlite")), "cafe").identity.id == "cafe"


def test_events_are_ordered_and_keep_live_images_and_tombstones(tmp_path: Path) -> None:
    journal = Journal(open_engine(str(tmp_path / JOURNAL)))
    assert journal.sequence == 0 and journal.oldest_sequence() == 1
    assert journal.append(ADDED, "a", b"1" * 32, 100) == 1
    assert journal.append(ADDED, "b", b"2" * 32) == 2
    assert journal.append(EXPIRY_CHANGED, "a", b"1" * 32, 200) == 3
    assert journal.append(DELETED, "b", b"2" * 32) == 4
    assert [e.sequence for e in journal.events_after(1)] == [2, 3, 4]
    assert journal.events_after(4) == []
    assert {n: (e.digest, e.expires_unix) for n, e in journal.live().items()} == \
        {"a": (b"1" * 32, 200)}
    assert journal.tombstones() == {"b": b"2" * 32}
    snapshot = journal.snapshot(list(journal.live().values()), batch=1)
    assert [(b.last, b.sequence, [e.name for e in b.entries]) for b in snapshot] == \
        [(False, 0, ["a"]), (True, 4, ["b"])]
    assert snapshot[1].entries[0].deleted
    journal.prune(keep=2)
    assert journal.oldest_sequence() == 3
    reopened = Journal(open_engine(str(tmp_path / JOURNAL)))
    assert reopened.sequence == 4  # sequences are never reused


def test_a_followers_position_persists(tmp_path: Path) -> None:
    journal = Journal(open_engine(str(tmp_path / JOURNAL)))
    assert journal.position() is None
    assert peek(tmp_path / JOURNAL)[1] is False
    journal.save_position(Position("up", 3, 7, False, ["up", "master"]))
    journal.save_position(Position("up", 3, 9, True, ["up", "master"]))
    assert Journal(open_engine(str(tmp_path / JOURNAL))).position() == \
        Position("up", 3, 9, True, ["up", "master"])
    identity, followed = peek(tmp_path / JOURNAL)
    assert followed and identity is not None and identity.id == journal.identity.id


def test_peek_reads_without_writing(tmp_path: Path) -> None:
    assert peek(tmp_path / JOURNAL) == (None, False)
    assert list(tmp_path.iterdir()) == []
    opened(tmp_path / "state")
    before = sorted(p.name for p in (tmp_path / "state").iterdir())
    identity, followed = peek(tmp_path / "state" / JOURNAL)
    assert identity is not None and identity.generation == 2 and not followed
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == before


def test_listeners_hear_every_append(tmp_path: Path) -> None:
    async def scenario(folder: Path) -> None:
        journal = Journal(open_engine(str(folder / JOURNAL)))
        changed = journal.listen()
        await asyncio.to_thread(journal.append, ADDED, "a", b"1" * 32)  # another thread too
        await asyncio.wait_for(changed.wait(), 5)
        journal.unlisten(changed)
        changed.clear()
        journal.append(ADDED, "b", b"2" * 32)
        await asyncio.sleep(0.01)
        assert not changed.is_set()

    asyncio.run(scenario(tmp_path))


def test_store_journals_adds_deletes_and_expiry(tmp_path: Path) -> None:
    store = opened(tmp_path)
    store.add(image(store, "a", b"content a"))
    store.set_expiry("a", 4_000_000_000)
    store.add(image(store, "b", b"content b"))
    assert store.delete_if("b", b"\0" * 32) is False  # another content: kept
    assert store.delete_if("b", store.images["b"].digest) is True
    assert kinds(store.journal) == [(Kind.ADDED, "a"), (Kind.EXPIRY_CHANGED, "a"),
                                    (Kind.ADDED, "b"), (Kind.DELETED, "b")]
    assert store.journal.events_after(1)[0].entry.expires_unix == 4_000_000_000


def test_a_name_is_bound_to_one_content_forever(tmp_path: Path) -> None:
    store = opened(tmp_path)
    first = image(store, "app", b"version 1")
    store.add(first)
    with pytest.raises(ExistsError, match="already exists"):
        store.add(image(store, "app", b"version 2"))
    store.delete("app")
    other = image(store, "app", b"version 2")
    with pytest.raises(ExistsError) as refused:
        store.add(other)
    message = str(refused.value)
    assert manifest_digest(first).hex()[:12] in message
    assert manifest_digest(other).hex()[:12] in message
    store.add(image(store, "app", b"version 1"))  # the same content may come back
    assert store.journal.tombstones() == {}
    assert store.images["app"].digest == manifest_digest(first)


def test_add_replicated_keeps_upstreams_bytes_and_checks_the_digest(tmp_path: Path) -> None:
    store = opened(tmp_path)
    source = image(store, "img", b"payload")
    source.created_unix = 1234
    data = image_to_proto(source).SerializeToString(deterministic=True)
    with pytest.raises(Exception, match="digest"):
        store.add_replicated(data, b"\1" * 32)
    store.add_replicated(data, manifest_digest(source))
    assert store.read("img") == data


def test_a_crash_between_image_file_and_journal_heals_at_load(tmp_path: Path) -> None:
    store = opened(tmp_path)
    store.add(image(store, "kept", b"kept"))
    store.add(image(store, "gone", b"gone"))
    digest = store.images["gone"].digest
    del store
    # The file of "gone" went away (a delete killed before its journal row) and a new
    # image's file arrived without its row (an add killed the same way).
    os.unlink(tmp_path / "images" / "gone" / IMAGE_FILE)
    other = ImageStore(tmp_path / "elsewhere")
    orphan = image(other, "orphan", b"orphan")
    (tmp_path / "images" / "orphan").mkdir()
    (tmp_path / "images" / "orphan" / IMAGE_FILE).write_bytes(
        image_to_proto(orphan).SerializeToString())
    healed = opened(tmp_path)
    assert kinds(healed.journal)[2:] == [(Kind.ADDED, "orphan"), (Kind.DELETED, "gone")]
    assert set(healed.journal.live()) == {"kept", "orphan"}
    assert healed.journal.tombstones() == {"gone": digest}
    assert len(kinds(opened(tmp_path).journal)) == 4  # nothing more to heal


def test_quarantine_moves_a_copy_aside_and_keeps_its_objects(tmp_path: Path) -> None:
    store = opened(tmp_path)
    local = image(store, "app", b"local variant", b"shared")
    store.add(local)
    upstream = b"\7" * 32
    store.quarantine("app", upstream)
    assert "app" not in store.images
    assert not (tmp_path / "images" / "app").exists()
    entry = store.quarantined["app"]
    assert (entry.local_digest, entry.upstream_digest) == (manifest_digest(local), upstream)
    assert kinds(store.journal)[-1] == (Kind.DELETED, "app")
    assert store.collect_orphans(grace=0, now=2**40) == (0, 0)  # its objects stay
    reloaded = opened(tmp_path)
    assert reloaded.quarantined["app"].upstream_digest == upstream
    assert reloaded.collect_orphans(grace=0, now=2**40) == (0, 0)
    assert reloaded.discard_quarantined("app") == (2, len(b"local variant") + len(b"shared"))
    assert reloaded.quarantined == {} and not (tmp_path / "quarantine" / "app").exists()
