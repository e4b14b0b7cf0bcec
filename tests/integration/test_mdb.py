"""The machine database: Dominator's JSON, the store on real SQLite files (and on
PostgreSQL when FLEET_TEST_POSTGRES_URL is set), migrations and the change feed."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

import mdb.store
from fleetlib.errors import FleetError, NotFoundError
from fleetlib.sql.engine import open_engine
from mdb.machine import Machine, check_address, machines_json, parse_machines_json
from mdb.models import Base
from mdb.store import HISTORY, Mdb

SAMPLE: list[dict[str, Any]] = [
    {"Hostname": "web1.example.com", "IpAddress": "10.0.0.1", "RequiredImage": "web/2024-05-01",
     "PlannedImage": "web/2024-05-08", "DisableUpdates": False, "OwnerGroup": "web",
     "Tags": {"role": "web", "rack": "r12"}, "Location": "us-east/dc1/rack4"},
    {"Hostname": "db1", "IpAddress": "[fd00::5]:6969", "RequiredImage": "db/17",
     "PlannedImage": "", "DisableUpdates": True, "OwnerGroup": "dba", "Tags": {}, "Location": ""},
    {"Hostname": "cache-7", "IpAddress": "cache-7.internal:6969", "RequiredImage": "",
     "PlannedImage": "", "DisableUpdates": False, "OwnerGroup": "", "Tags": {"role": "cache"},
     "Location": ""},
    {"Hostname": "web2.example.com", "IpAddress": "", "RequiredImage": "web/2024-05-01",
     "PlannedImage": "", "DisableUpdates": False, "OwnerGroup": "web", "Tags": {"role": "web"},
     "Location": ""},
    {"Hostname": "lb1", "IpAddress": "192.0.2.7", "RequiredImage": "lb/3", "PlannedImage": "",
     "DisableUpdates": False, "OwnerGroup": "net", "Tags": {"role": "lb"}, "Location": ""},
]


def machines(*hostnames: str, **fields: object) -> list[Machine]:
    # `fields` are Machine's keyword arguments, whose types differ: each test gives the right ones.
    return [Machine(hostname, **fields) for hostname in hostnames]  # type: ignore[arg-type]


@pytest.fixture
def store(url: str) -> Iterator[Mdb]:
    with Mdb(url) as opened:
        yield opened


def as_sorted_json(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(items, key=lambda item: item["Hostname"])


# --- Machine and Dominator's JSON ---------------------------------------------------

def test_json_round_trip_through_the_store(store: Mdb) -> None:
    added = store.import_machines(parse_machines_json(json.dumps(SAMPLE), "machines.json"))
    assert added == (len(SAMPLE), 0, 0)
    exported = json.loads(machines_json(store.export_machines()))
    assert exported == as_sorted_json(SAMPLE)
    assert [item["Hostname"] for item in exported] == sorted(item["Hostname"] for item in SAMPLE)


def test_optional_fields_default_and_export_writes_every_key() -> None:
    [machine] = parse_machines_json('[{"Hostname": "a"}]', "m.json")
    assert machine == Machine("a")
    assert machine.to_json() == {"Hostname": "a", "IpAddress": "", "RequiredImage": "",
                                 "PlannedImage": "", "DisableUpdates": False,
                                 "OwnerGroup": "", "Tags": {}, "Location": ""}


def test_machine_is_frozen_hashable_and_compares_by_value() -> None:
    one = Machine("a", tags={"role": "web"})
    assert one == Machine("a", tags={"role": "web"}) != Machine("a", tags={"role": "db"})
    assert len({one, Machine("a", tags={"role": "web"})}) == 1
    assert one.tags == {"role": "web"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        one.hostname = "b"  # type: ignore[misc]  # on purpose: Machine is frozen
    with pytest.raises(TypeError):
        one.tags["role"] = "db"  # type: ignore[index]  # on purpose: tags are read-only


def test_constructor_validates_like_the_json_reader() -> None:
    with pytest.raises(FleetError, match="machine 'a': PlannedImage: invalid image name"):
        Machine("a", planned_image="/abs")
    with pytest.raises(FleetError, match="DisableUpdates: expected true or false, got a string"):
        Machine("a", disable_updates="yes")  # type: ignore[arg-type]  # a wrong type on purpose


BAD_JSON = [
    ("not json", "m.json: malformed JSON"),
    ('{"Hostname": "a"}', "m.json: expected a JSON array of machines, got an object"),
    ('[{"Hostname": "a"}, 7]',
     'm.json: entry 1: expected an object {"Hostname": ...}, got a number'),
    ('[{"Hostname": "a"}, {"Hostname": "b", "Colour": "red"}]',
     "m.json: entry 1: unknown field 'Colour'"),
    ('[{"Hostname": "a"}, {"IpAddress": "10.0.0.1"}]', "m.json: entry 1: Hostname is missing"),
    ('[{"Hostname": "a", "DisableUpdates": "yes"}]',
     "m.json: entry 0: DisableUpdates: expected true or false, got a string"),
    ('[{"Hostname": 5}]', "m.json: entry 0: Hostname: expected a string, got a number"),
    ('[{"Hostname": "a", "Tags": ["x"]}]',
     "m.json: entry 0: Tags: expected an object, got an array"),
    ('[{"Hostname": "a", "Tags": {"rack": 12}}]',
     "m.json: entry 0: machine 'a': Tags: 'rack': expected a string, got a number"),
    ('[{"Hostname": "a"}, {"Hostname": "bad_host"}]',
     "m.json: entry 1: Hostname: invalid hostname 'bad_host'"),
    ('[{"Hostname": "-a"}]', "m.json: entry 0: Hostname: invalid hostname '-a'"),
    (json.dumps([{"Hostname": "a" * 64}]), "m.json: entry 0: Hostname: invalid hostname"),
    (json.dumps([{"Hostname": ".".join(["a" * 63] * 4)}]),  # 255 characters
     "m.json: entry 0: Hostname: invalid hostname"),
    ('[{"Hostname": "a"}, {"Hostname": "b"}, {"Hostname": "a"}]',
     "m.json: entry 2: duplicate Hostname 'a' (first at entry 0)"),
    ('[{"Hostname": "a", "RequiredImage": "web/../etc"}]',
     "m.json: entry 0: machine 'a': RequiredImage: invalid image name 'web/../etc'"),
    ('[{"Hostname": "a", "IpAddress": "10.0.0.1:99999"}]',
     "m.json: entry 0: machine 'a': IpAddress: invalid address '10.0.0.1:99999'"),
    ('[{"Hostname": "a", "Location": "us-east"}]',
     "m.json: entry 0: machine 'a': Location: invalid location 'us-east': use REGION/DC"),
    ('[{"Hostname": "a", "Location": "us east/dc1"}]', "Location: invalid location"),
    ('[{"Hostname": "a", "Location": "us/dc1/r4/x"}]', "Location: invalid location"),
    ('[{"Hostname": "a", "Location": "us//r4"}]', "Location: invalid location"),
    ('[{"Hostname": "a", "Location": "us/../r4"}]', "Location: invalid location"),
    ('[{"Hostname": "a", "Location": 4}]', "Location: expected a string, got a number"),
]


@pytest.mark.parametrize(("text", "message"), BAD_JSON)
def test_bad_json_names_the_entry_and_field(text: str, message: str) -> None:
    with pytest.raises(FleetError) as raised:
        parse_machines_json(text, "m.json")
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("address", ["10.0.0.1", "10.0.0.1:6969", "::1", "fd00::5",
                                     "[fd00::5]:6969", "host", "host.example.com:22"])
def test_good_addresses(address: str) -> None:
    assert check_address(address) == address


@pytest.mark.parametrize("address", ["host:0", "host:http", "bad_host", "[nothex]:1", "a:b:c",
                                     "host:", "10.0.0.1:65536"])
def test_bad_addresses(address: str) -> None:
    with pytest.raises(FleetError, match="invalid address"):
        check_address(address)


# --- the store ------------------------------------------------------------------------

def test_get_set_update_delete(store: Mdb) -> None:
    assert store.get("a") is None
    store.set(Machine("a", required_image="web/1", tags={"role": "web"}))
    assert store.get("a") == Machine("a", required_image="web/1", tags={"role": "web"})
    updated = store.update("a", planned_image="web/2", disable_updates=True)
    assert updated == Machine("a", required_image="web/1", planned_image="web/2",
                              disable_updates=True, tags={"role": "web"})
    assert store.get("a") == updated
    store.delete("a")
    assert store.get("a") is None and store.list() == []


def test_update_and_delete_refuse_what_they_cannot_do(store: Mdb) -> None:
    store.set(Machine("a"))
    with pytest.raises(NotFoundError, match="'ghost' is not in the MDB"):
        store.update("ghost", required_image="web/1")
    with pytest.raises(NotFoundError):
        store.delete("ghost")
    with pytest.raises(FleetError, match="cannot update machine field 'colour'"):
        store.update("a", colour="red")
    with pytest.raises(FleetError, match="cannot update machine field 'hostname'"):
        store.update("a", hostname="b")
    with pytest.raises(FleetError, match="RequiredImage: invalid image name"):
        store.update("a", required_image="/abs")
    assert store.list() == [Machine("a")]


def test_list_is_sorted_and_selectable(store: Mdb) -> None:
    store.import_machines(parse_machines_json(json.dumps(SAMPLE), "machines.json"))
    assert [m.hostname for m in store.list()] == sorted(item["Hostname"] for item in SAMPLE)
    web = store.list(lambda machine: machine.tags.get("role") == "web")
    assert [m.hostname for m in web] == ["web1.example.com", "web2.example.com"]


def test_an_invalid_row_marks_its_host_and_no_other(store: Mdb, url: str) -> None:
    """A row another tool wrote (bad image name, tags that are not JSON) is reported
    by `load` with its reason; every valid machine still loads, and `list` names it."""
    store.import_machines(machines("good-1", "good-2", required_image="web/1"))
    engine = open_engine(url)
    with engine.begin() as connection:
        connection.execute(sa.text(
            "INSERT INTO machines (hostname, address, required_image, planned_image, "
            "disable_updates, owner_group, tags, updated_unix) VALUES "
            "('bad-image', '', '../etc', '', false, '', '{}', 0), "
            "('bad-tags', '', '', '', false, '', 'not json', 0)"))
    engine.dispose()
    valid, invalid = store.load()
    assert [m.hostname for m in valid] == ["good-1", "good-2"]
    assert [row.hostname for row in invalid] == ["bad-image", "bad-tags"]
    assert "RequiredImage" in invalid[0].reason and "Tags" in invalid[1].reason
    with pytest.raises(FleetError, match="MDB row 'bad-image'"):
        store.list()


def test_revision_moves_on_every_change_and_only_then(store: Mdb) -> None:
    start = store.revision()
    store.set(Machine("a"))
    assert store.revision() == start + 1
    store.set(Machine("a"))  # identical: nothing changed
    store.update("a")
    assert store.revision() == start + 1
    store.update("a", required_image="web/1")
    assert store.revision() == start + 2
    assert store.import_machines(machines("a", "b")) == (1, 1, 0)
    assert store.revision() == start + 3
    assert store.import_machines(machines("a", "b")) == (0, 0, 0)
    assert store.revision() == start + 3
    store.delete("b")
    assert store.revision() == start + 4
    for failing in (lambda: store.delete("b"), lambda: store.update("b", owner_group="x")):
        with pytest.raises(NotFoundError):
            failing()
    store.get("a"), store.list(), store.export_machines(), store.revision()
    assert store.revision() == start + 4


def test_import_replace_removes_the_hosts_not_listed(store: Mdb) -> None:
    store.import_machines(machines("a", "b", "c"))
    assert store.import_machines([Machine("b", owner_group="x"), Machine("d")]) == (1, 1, 0)
    assert [m.hostname for m in store.list()] == ["a", "b", "c", "d"]
    assert store.import_machines([Machine("b", owner_group="x"), Machine("e")],
                                 replace=True) == (1, 0, 3)
    assert store.list() == [Machine("b", owner_group="x"), Machine("e")]
    assert store.import_machines([], replace=True) == (0, 0, 2)
    assert store.list() == []


def test_import_of_a_bad_file_changes_nothing(store: Mdb, tmp_path: Path) -> None:
    store.import_machines(machines("old1", "old2"))
    revision = store.revision()
    entries = [{"Hostname": f"new{index}"} for index in range(8)]
    entries[4]["RequiredImage"] = "bad//name"
    path = tmp_path / "machines.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(FleetError, match="entry 4: machine 'new4': RequiredImage"):
        store.import_machines(parse_machines_json(path.read_text(), str(path)), replace=True)
    assert [m.hostname for m in store.list()] == ["old1", "old2"]
    assert store.revision() == revision


def test_import_is_one_transaction(store: Mdb, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure while writing the 5th machine (after the first four reached the
    database) rolls back the whole import, removals included."""
    store.import_machines(machines("old1", "old2"))
    revision = store.revision()
    real_store = mdb.store._store
    calls = 0

    # Stands in for the store's private row writer, whatever its signature.
    def failing_store(session, machine, row):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls == 5:
            session.flush()
            raise FleetError("disk full (simulated)")
        return real_store(session, machine, row)

    monkeypatch.setattr(mdb.store, "_store", failing_store)
    with pytest.raises(FleetError, match="simulated"):
        store.import_machines(machines(*(f"new{index}" for index in range(8))), replace=True)
    monkeypatch.undo()
    assert [m.hostname for m in store.list()] == ["old1", "old2"]
    assert store.revision() == revision


def test_import_refuses_duplicate_hostnames(store: Mdb) -> None:
    with pytest.raises(FleetError, match="duplicate Hostname 'a'"):
        store.import_machines(machines("a", "b", "a"))
    assert store.list() == []


async def test_concurrent_writers_from_threads(store: Mdb) -> None:
    """What the dominator does: calls from asyncio through worker threads."""
    start = store.revision()
    await asyncio.gather(*(asyncio.to_thread(store.set, Machine(f"host{index}"))
                           for index in range(20)),
                         *(asyncio.to_thread(store.revision) for _ in range(20)))
    assert len(store.list()) == 20
    assert store.revision() == start + 20


def test_reopening_keeps_everything(url: str) -> None:
    with Mdb(url) as first:
        first.import_machines(parse_machines_json(json.dumps(SAMPLE), "machines.json"))
        revision = first.revision()
    with Mdb(url) as second:
        assert second.revision() == revision
        assert [m.to_json() for m in second.list()] == as_sorted_json(SAMPLE)


# --- migrations -----------------------------------------------------------------------

def test_models_match_the_migrated_schema(store: Mdb, url: str) -> None:
    engine = open_engine(url)
    inspector = sa.inspect(engine)
    for table in Base.metadata.sorted_tables:
        assert {column["name"] for column in inspector.get_columns(table.name)} == \
            set(table.columns.keys())
    assert {index["name"] for index in inspector.get_indexes("machines")} == \
        {index.name for index in Base.metadata.tables["machines"].indexes}
    engine.dispose()


def test_processes_opening_a_new_database_at_once_take_turns(url: str) -> None:
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        opened = list(pool.map(lambda _: Mdb(url), range(6)))
    assert {store.schema_revision for store in opened} == {HISTORY.head()}
    opened[0].set(Machine("a"))
    assert opened[-1].list() == [Machine("a")]
    for store in opened:
        store.close()


# --- opening ------------------------------------------------------------------------------

@pytest.mark.parametrize(("url", "message"), [
    ("", "empty database URL"),
    ("postgresql+psycopg://user:s3cret@127.0.0.1:1/mdb",
     "database postgresql+psycopg://user:***@127.0.0.1:1/mdb?connect_timeout=10: "),
    ("nosuchdb://host/x", "cannot use database nosuchdb://host/x"),
    ("sqlite:////nonexistent/directory/mdb.sqlite", "unable to open database file"),
    ("sqlite://", "in-memory SQLite cannot be shared between threads"),
    ("://mdb", "invalid database URL"),
    ("postgresql+psycopg://user:s3cret@host:port/mdb", "invalid database URL"),
])
def test_bad_urls_are_one_line_errors(url: str, message: str) -> None:
    with pytest.raises(FleetError) as raised:
        Mdb(url)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value) and "s3cret" not in str(raised.value)


def test_sqlite_files_are_private(tmp_path: Path) -> None:
    """The state databases hold who did what: owner-only, new or already there."""
    fresh = tmp_path / "fresh.db"
    Mdb(str(fresh)).close()
    assert fresh.stat().st_mode & 0o777 == 0o600
    loose = tmp_path / "loose.db"
    Mdb(str(loose)).close()
    loose.chmod(0o644)
    with Mdb(str(loose)) as store:
        store.set(Machine("h1"))
    assert loose.stat().st_mode & 0o777 == 0o600
    for companion in tmp_path.glob("loose.db-*"):  # -wal and -shm copy the file's mode
        assert companion.stat().st_mode & 0o077 == 0, companion


def test_sqlite_url_and_bare_path_are_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "mdb.sqlite"
    with Mdb(str(path)) as by_path:
        by_path.set(Machine("a"))
    with Mdb(f"sqlite:///{path}") as by_url:
        assert by_url.list() == [Machine("a")]
