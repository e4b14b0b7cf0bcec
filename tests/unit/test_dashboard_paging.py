"""The dashboard's host table over 2,500 hosts (real Sub and HostRecord objects in
the herd's and state store's places, `bench/herdview.py`, through the
real HTTP application): pages hold the right rows in the right order, filters and
sorts apply before paging, counts and page links say where a page is, every bad
parameter is a one-line 400, and the overview lists no host rows."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from bench.herdview import dashboard_app, many_hosts
from dominator.herd.herd import Sub
from dominator.herd.records import HostRecord
from dominator.herd.status import Status
from fleetlib.fstree.listing import quote
from mdb.machine import Machine

HOSTS = 2500
ODD_PATH = "/etc/back\\slash\x07"  # quote() escapes it: \\ and \x07


@pytest.fixture(scope="module")
def fleet() -> tuple[dict[str, Sub], dict[str, HostRecord]]:
    subs, records = many_hosts(HOSTS)
    records["h7"] = HostRecord(current_image="web/v1", intrusion_paths=(ODD_PATH,),
                               intrusion_unix=1)
    return subs, records


@pytest.fixture(scope="module")
def client(fleet: tuple[dict[str, Sub], dict[str, HostRecord]]) -> Iterator[TestClient]:
    with TestClient(dashboard_app(*fleet)) as client:
        yield client


def rows(page: str) -> list[str]:
    """The hostnames of the host table's rows, in order."""
    return re.findall(r'<tr data-host="([^"]+)"', page)


def test_page_two_holds_the_right_rows_in_order(
        client: TestClient, fleet: tuple[dict[str, Sub], dict[str, HostRecord]]) -> None:
    subs, _ = fleet
    synced = [name for name, sub in subs.items() if sub.status == Status.SYNCED]
    # Newest poll first; hosts polled in the same second stay in hostname order.
    expected = sorted(synced, key=lambda name: (-int(subs[name].last_poll_unix), name))
    assert len(expected) > 1000  # several pages, and ties to break

    page = client.get("/hosts", params={"status": "synced", "sort": "last_poll", "desc": "yes",
                                        "page": 2})
    assert page.status_code == 200, page.text
    assert rows(page.text) == expected[100:200]
    assert f"hosts 101-200 of {len(expected):,} matching (2,500 in all)" in page.text

    same = client.get("/hosts.json", params={"status": "synced", "sort": "-last_poll",
                                             "page": 2}).json()
    assert [h["hostname"] for h in same["hosts"]] == expected[100:200]
    assert (same["total"], same["shown"]) == (HOSTS, len(expected))
    assert same["paging"] == {"page": 2, "per_page": 100, "pages": -(-len(expected) // 100),
                              "first": 101, "last": 200}

    last = client.get("/hosts.json", params={"status": "synced", "sort": "-last_poll",
                                             "per_page": 1000, "page": 2}).json()
    assert [h["hostname"] for h in last["hosts"]] == expected[1000:2000]


def test_default_page_and_links(client: TestClient,
                                fleet: tuple[dict[str, Sub], dict[str, HostRecord]]) -> None:
    names = sorted(fleet[0])  # hostname order: h0, h1, h10, h100, ...
    page = client.get("/hosts").text
    assert rows(page) == names[:100]
    assert "hosts 1-100 of 2,500, page 1 of 25" in page
    assert 'href="/hosts?sort=hostname&amp;page=2"' in page  # next
    assert 'href="/hosts?sort=hostname&amp;page=25"' in page  # last
    assert "page=0" not in page and "page=26" not in page

    middle = client.get("/hosts", params={"page": 7, "per_page": 50}).text
    assert rows(middle) == names[300:350]
    assert 'href="/hosts?sort=hostname&amp;per_page=50"' in middle  # first
    for number in (4, 6, 8, 10, 50):  # the pages around, last
        assert f'per_page=50&amp;page={number}"' in middle, number
    assert '<strong class="here">7</strong>' in middle
    # Sorting goes back to page 1 and keeps the page size and filters.
    filtered = client.get("/hosts", params={"q": "web", "page": 3}).text
    assert 'href="/hosts?q=web&amp;sort=status"' in filtered


def test_filters_apply_before_paging(
        client: TestClient, fleet: tuple[dict[str, Sub], dict[str, HostRecord]]) -> None:
    subs, records = fleet
    wanted = sorted(name for name, sub in subs.items()
                    if "web/v2" in (sub.machine.required_image, sub.machine.planned_image,
                                    records[name].current_image)
                    and sub.status in (Status.SYNCED, Status.FAILED))
    listed = client.get("/hosts.json", params={"image": "web/v2", "status": "synced,update failed",
                                               "per_page": 20, "page": 3}).json()
    assert [h["hostname"] for h in listed["hosts"]] == wanted[40:60]
    assert listed["shown"] == len(wanted)

    searched = client.get("/hosts.json", params={"q": "R13 ", "sort": "hostname"}).json()
    assert [h["hostname"] for h in searched["hosts"]] == sorted(
        name for name, sub in subs.items() if sub.machine.tags["rack"] == "r13")

    intruded = client.get("/hosts.json", params={"intrusion": "yes"}).json()["hosts"]
    assert {h["hostname"] for h in intruded} == {
        name for name, record in records.items() if record.intrusion_paths}

    empty = client.get("/hosts", params={"q": "no-such-host"}).text
    assert rows(empty) == [] and "no host matches (2,500 in all)" in empty


def test_every_host_in_the_json_twin_unless_paged(client: TestClient) -> None:
    everyone = client.get("/hosts.json").json()
    assert len(everyone["hosts"]) == everyone["shown"] == HOSTS
    assert everyone["paging"]["per_page"] is None and everyone["paging"]["pages"] == 1


def test_a_page_past_the_end_is_empty(client: TestClient) -> None:
    page = client.get("/hosts", params={"page": 26})
    assert page.status_code == 200 and rows(page.text) == []
    assert "page 26 is past the last page (25)" in page.text
    assert client.get("/hosts.json", params={"page": 26}).json()["hosts"] == []


@pytest.mark.parametrize(("params", "message"), [
    ({"page": "0"}, "page must be a whole number from 1, not '0'"),
    ({"page": "two"}, "page must be a whole number from 1, not 'two'"),
    ({"page": "-1"}, "page must be a whole number from 1"),
    ({"page": "1_0"}, "page must be a whole number from 1"),
    ({"page": "9" * 5000}, "page must be a whole number from 1, not '99999"),
    ({"per_page": "1001"}, "per_page must be a whole number from 1 to 1000, not '1001'"),
    ({"per_page": "0"}, "per_page must be a whole number from 1 to 1000"),
    ({"sort": "colour"}, "unknown sort key 'colour'; one of: hostname, status"),
    ({"sort": "last_poll", "desc": "maybe"}, "desc must be yes or no, not 'maybe'"),
    ({"status": "asleep"}, "unknown status 'asleep'; one of:"),
    ({"intrusion": "2"}, "intrusion must be yes or no"),
    ({"unreachable": "week"}, "unreachable must be one of: minute, hour, day, not 'week'"),
    ({"q": "x" * 300}, "q is longer than 256 characters"),
    ({"pgae": "2"}, "unknown parameter 'pgae'; /hosts takes: status, q, image"),
    ([("page", "1"), ("page", "2")], "page given more than once"),
])
def test_bad_parameters_are_one_line_400s(client: TestClient, params: object,
                                          message: str) -> None:
    reply = client.get("/hosts.json", params=params)  # type: ignore[arg-type]
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error.startswith(message) and "\n" not in error and len(error) < 400, error
    page = client.get("/hosts", params=params)  # type: ignore[arg-type]
    assert page.status_code == 400 and page.headers["content-type"].startswith("text/html")
    assert "<h1>Bad request</h1>" in page.text and "Traceback" not in page.text
    assert message.replace("'", "&#39;") in page.text


def test_overview_lists_counts_not_hosts(
        client: TestClient, fleet: tuple[dict[str, Sub], dict[str, HostRecord]]) -> None:
    subs, records = fleet
    overview = client.get("/index.json").json()
    assert overview["hosts"] == HOSTS and sum(overview["by_status"].values()) == HOSTS
    assert overview["by_status"]["synced"] == sum(
        1 for sub in subs.values() if sub.status == Status.SYNCED)
    unreachable = sum(1 for sub in subs.values() if sub.status == Status.UNREACHABLE)
    assert overview["unreachable"] == dict.fromkeys(("now", "minute", "hour", "day"), unreachable)
    intruded = [name for name, record in records.items() if record.intrusion_paths]
    assert len(overview["intrusions"]) == len(intruded) > 50
    page = client.get("/").text
    assert rows(page) == [] and "data-host" not in page
    assert page.count('<tr><td><a href="/hosts/') == 50  # the first 50 intrusions
    assert f'All {len(intruded)} hosts with intrusions' in page


def test_text_is_made_printable_once(client: TestClient) -> None:
    """Intrusion paths were quoted twice (SubReport and the dashboard): a backslash
    showed as four."""
    once = [quote(ODD_PATH)]
    assert once == ["/etc/back\\\\slash\\x07"]
    assert client.get("/hosts/h7.json").json()["intrusion_paths"] == once
    overview = client.get("/index.json").json()
    listed = {row["hostname"]: row["paths"] for row in overview["intrusions"]}
    assert listed["h7"] == once


def test_what_the_table_keeps_follows_each_change() -> None:
    """The dashboard keeps every host's entry, search text and last unreachable time
    between requests: a new status, MDB entry, record or host shows at the next one."""
    subs, records = many_hosts(300)
    with TestClient(dashboard_app(subs, records)) as client:
        def names(**params: str) -> set[str]:
            return {h["hostname"] for h in client.get("/hosts.json", params=params).json()["hosts"]}
        assert "h42" not in names(q="rack=moved") | names(unreachable="minute")
        sub = subs["h42"]
        sub.set_status(Status.UNREACHABLE, "unreachable: gone")
        sub.machine = dataclasses.replace(sub.machine, tags={"rack": "moved"})
        assert "h42" in names(q="rack=moved") and "h42" in names(unreachable="minute")
        assert client.get("/index.json").json()["unreachable"]["now"] == sum(
            1 for s in subs.values() if s.status == Status.UNREACHABLE)
        sub.set_status(Status.SYNCED)
        assert "h42" in names(unreachable="minute")  # it was, a moment ago
        assert "h42" not in names(status="unreachable")
        del subs["h42"]
        assert "h42" not in names(q="rack=moved")
        records["h43"] = dataclasses.replace(records["h43"], current_image="fresh/v9")
        assert names(image="fresh/v9") == {"h43"}
        subs["h42"] = Sub(machine=Machine(hostname="h42", address="10.9.9.9:6969",
                                          tags={"rack": "back"}))
        assert names(q="rack=back") == {"h42"} and len(names()) == 300
