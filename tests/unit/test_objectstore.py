"""Tests of fstree.objectstore: layout, batches, verification, recovery, concurrency,
and fstree.hashing."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import threading
from pathlib import Path

import pytest

from fleetlib.errors import FleetError, NoSpaceError, NotFoundError
from fleetlib.fstree.hashing import check_hash, format_hash, hash_bytes, hash_fd, parse_hash
from fleetlib.fstree.objectstore import TMP_DIR, ObjectStore, write_file_atomically


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.fixture
def store(tmp_path: Path) -> ObjectStore:
    return ObjectStore(tmp_path / "objects")


def test_add_has_size_open_remove(store: ObjectStore) -> None:
    data = b"hello object\n"
    digest = store.add_bytes(data)
    assert digest == sha(data)
    assert store.has(digest)
    assert store.size_of(digest) == len(data)
    with store.open(digest) as f:
        assert f.read() == data
    assert store.add_bytes(data) == digest  # idempotent
    assert store.remove(digest) == len(data)
    assert not store.has(digest)
    assert store.size_of(digest) is None
    assert store.remove(digest) == 0
    with pytest.raises(NotFoundError):
        store.open(digest)
    with pytest.raises(FleetError):
        store.open(digest)


def test_path_layout(store: ObjectStore) -> None:
    digest = store.add_bytes(b"layout")
    hexa = digest.hex()
    expected = store.root / hexa[:2] / hexa[2:4] / hexa[4:]
    assert store.path_of(digest) == os.fspath(expected)
    assert expected.read_bytes() == b"layout"
    assert files_under(store.root) == [expected]
    with pytest.raises(FleetError):
        store.path_of(b"short")


def test_empty_data_is_not_an_object(store: ObjectStore) -> None:
    with pytest.raises(FleetError, match="empty"):
        store.add_bytes(b"")
    with pytest.raises(FleetError):
        store.batch().begin(sha(b""), 0)
    with pytest.raises(FleetError):
        store.batch().begin(b"\0" * 31, 5)


def test_batch_visible_only_after_commit(store: ObjectStore) -> None:
    contents = [os.urandom(1000 + n) for n in range(5)]
    batch = store.batch()
    for data in contents:
        writer = batch.begin(sha(data), len(data))
        writer.write(data[:100])
        writer.write(memoryview(data)[100:])
        writer.finish()
        assert not store.has(sha(data))
    assert list(store) == []
    assert batch.commit() == 5
    for data in contents:
        with store.open(sha(data)) as f:
            assert f.read() == data
    assert sorted(store) == sorted(sha(d) for d in contents)
    assert batch.commit() == 0
    assert list((store.root / TMP_DIR).iterdir()) == []


def test_batch_abort_forgets_everything(store: ObjectStore) -> None:
    batch = store.batch()
    writer = batch.begin(sha(b"abc"), 3)
    writer.write(b"abc")
    writer.finish()
    batch.abort()
    assert batch.commit() == 0
    assert not store.has(sha(b"abc"))
    assert files_under(store.root) == []


@pytest.mark.parametrize("case", ["wrong hash", "too many", "too few"])
def test_writer_rejects_bad_content(store: ObjectStore, case: str) -> None:
    data = b"the real content"
    batch = store.batch()
    writer = batch.begin(sha(data), len(data))
    with pytest.raises(FleetError):
        if case == "wrong hash":
            writer.write(b"the fake content")
            writer.finish()
        elif case == "too many":
            writer.write(data + b"!")
        else:
            writer.write(data[:-1])
            writer.finish()
    assert batch.commit() == 0
    assert not store.has(sha(data))
    assert not os.path.exists(store.path_of(sha(data)))
    assert files_under(store.root) == []  # nothing at the final path nor in .tmp


def test_recover_removes_leftovers(store: ObjectStore) -> None:
    batch = store.batch()
    writer = batch.begin(sha(b"partial!"), 8)
    writer.write(b"part")
    store.drain()  # its partial file is on disk when the process "dies" here
    (store.root / TMP_DIR / "stray").write_bytes(b"x")
    assert len(list((store.root / TMP_DIR).iterdir())) == 2
    reopened = ObjectStore(store.root)
    assert reopened.recover() == 2
    assert list((store.root / TMP_DIR).iterdir()) == []
    assert reopened.recover() == 0
    assert not reopened.has(sha(b"partial!"))


def test_concurrent_writers_of_one_object(store: ObjectStore) -> None:
    data = os.urandom(1 << 20)
    digest = sha(data)
    threads = 8
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def write() -> None:
        try:
            other = ObjectStore(store.root)
            batch = other.batch()
            writer = batch.begin(digest, len(data))
            barrier.wait()
            for start in range(0, len(data), 65536):
                writer.write(data[start:start + 65536])
            writer.finish()
            batch.commit()
        except BaseException as err:
            errors.append(err)

    workers = [threading.Thread(target=write) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []
    assert list(store) == [digest]
    with store.open(digest) as f:
        assert sha(f.read()) == digest
    assert files_under(store.root) == [Path(store.path_of(digest))]


def test_concurrent_writers_of_many_objects(store: ObjectStore) -> None:
    contents = [os.urandom(100 + n) for n in range(64)]

    def write(part: list[bytes]) -> None:
        for data in part:
            store.add_bytes(data)

    workers = [threading.Thread(target=write, args=(contents[n::4],)) for n in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert sorted(store) == sorted(sha(d) for d in contents)


def test_iteration_ignores_foreign_files(store: ObjectStore) -> None:
    digest = store.add_bytes(b"real")
    (store.root / "README").write_text("not an object")
    (store.root / "zz" / "yy").mkdir(parents=True)
    (store.root / "zz" / "yy" / "not-hex").write_text("x")
    (store.root / "ab" / "cd").mkdir(parents=True, exist_ok=True)
    (store.root / "ab" / "cd" / "short").write_text("x")
    assert list(store) == [digest]


def test_scratch_store_is_flat(tmp_path: Path) -> None:
    scratch = ObjectStore(tmp_path / "scratch", scratch=True)
    assert not scratch.durable
    digest = scratch.add_bytes(b"scratch object")
    assert scratch.path_of(digest) == os.fspath(tmp_path / "scratch" / digest.hex())
    assert (tmp_path / "scratch" / digest.hex()).read_bytes() == b"scratch object"
    assert scratch.has(digest) and scratch.size_of(digest) == 14
    assert scratch.remove(digest) == 14
    assert files_under(tmp_path / "scratch") == []


def test_scratch_store_iteration(tmp_path: Path) -> None:
    scratch = ObjectStore(tmp_path / "scratch", scratch=True)
    digest = scratch.add_bytes(b"scratch object")
    assert list(scratch) == [digest]


def test_write_file_atomically(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "state.json"
    write_file_atomically(path, b"one", mode=0o600)
    assert path.read_bytes() == b"one"
    assert path.stat().st_mode & 0o7777 == 0o600
    inode = path.stat().st_ino
    write_file_atomically(path, b"two")
    assert path.read_bytes() == b"two"
    assert path.stat().st_ino != inode  # replaced by rename, not rewritten in place
    assert path.stat().st_mode & 0o7777 == 0o644
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json"]
    with pytest.raises(TypeError):
        write_file_atomically(path, "not bytes")  # type: ignore[arg-type]  # on purpose
    assert path.read_bytes() == b"two"
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json"]


def test_write_file_atomically_readers_never_see_a_mix(tmp_path: Path) -> None:
    path = tmp_path / "file"
    old, new = b"a" * 200_000, b"b" * 200_000
    write_file_atomically(path, old)
    stop = threading.Event()
    seen: set[bytes] = set()

    def read() -> None:
        while not stop.is_set():
            with open(path, "rb") as f:
                seen.add(f.read())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for n in range(60):
            write_file_atomically(path, new if n % 2 == 0 else old)
    finally:
        stop.set()
        reader.join()
    assert seen <= {old, new}
    assert seen  # the reader did read


def test_write_file_atomically_without_overwrite_lets_exactly_one_racer_win(
        tmp_path: Path) -> None:
    path = tmp_path / "key"
    start = threading.Barrier(8)
    outcomes: list[bytes | None] = []

    def write(n: int) -> None:
        data = str(n).encode() * 1000
        start.wait()
        try:
            write_file_atomically(path, data, overwrite=False)
            outcomes.append(data)
        except FileExistsError:
            outcomes.append(None)

    writers = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    winners = [data for data in outcomes if data is not None]
    assert len(outcomes) == 8 and len(winners) == 1
    assert path.read_bytes() == winners[0]  # nobody overwrote the winner
    assert os.listdir(tmp_path) == ["key"]  # the losers' temporary files are gone


# ---------------------------------------------------------------- hashing


def test_hashing(tmp_path: Path) -> None:
    digest = hash_bytes(b"abc")
    assert format_hash(digest) == "sha256:" + hashlib.sha256(b"abc").hexdigest()
    assert parse_hash(format_hash(digest)) == digest
    assert parse_hash(digest.hex()) == digest
    for bad in ("sha256:xyz", "sha256:" + "00" * 31, "", "sha256:" + "00" * 33):
        with pytest.raises(FleetError):
            parse_hash(bad)
    with pytest.raises(FleetError):
        check_hash(b"\0" * 33)
    path = tmp_path / "big"
    data = os.urandom((1 << 20) * 2 + 17)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert hash_fd(fd) == (sha(data), len(data))
    finally:
        os.close(fd)


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 4 MiB tmpfs (needs root to mount; skipped otherwise)."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs: {mounted.stderr.strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_object_larger_than_the_free_space_is_refused_up_front(small_fs: Path) -> None:
    store = ObjectStore(small_fs / "objects")
    batch = store.batch()
    with pytest.raises(NoSpaceError, match=f"insufficient space on {small_fs}/objects: need "
                                           f"{5 << 20} bytes, [0-9]+ available"):
        batch.begin(sha(b"x"), 5 << 20)
    writer = batch.begin(sha(b"y" * (3 << 20)), 3 << 20)  # fits, but its queued bytes count
    writer.write(b"y" * (3 << 20))
    with pytest.raises(NoSpaceError):
        batch.begin(sha(b"z" * (1 << 20)), 1 << 20)
    writer.finish()
    assert batch.commit() == 1


def test_disk_filling_while_writing_is_no_space_and_leaves_nothing(small_fs: Path) -> None:
    store = ObjectStore(small_fs / "objects")
    kept = store.add_bytes(b"kept")
    data = os.urandom(2 << 20)
    batch = store.batch()
    writer = batch.begin(sha(data), len(data))  # room now...
    with contextlib.suppress(OSError):  # ...taken by someone else meanwhile
        with open(small_fs / "filler", "wb") as filler:
            filler.write(b"\0" * (4 << 20))
    writer.write(data)
    writer.finish()
    with pytest.raises(NoSpaceError, match=f"insufficient space on {small_fs}/objects: no space "
                                           f"left on device writing object .* \\(2097152 bytes\\)"
                                           ", [0-9]+ bytes free"):
        batch.commit()
    assert not store.has(sha(data))
    assert list(store) == [kept]
    assert list(store.tmp_dir.iterdir()) == []
