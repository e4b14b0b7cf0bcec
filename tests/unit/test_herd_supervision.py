"""A dominator whose herd task dies stops, loudly, instead of answering health checks
while no host is watched (an in-process daemon on loopback ports)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from dominator.herd.herd import HerdConfig
from dominator.server.daemon import DaemonConfig, Server, run_server
from fleetlib.errors import FleetError
from fleetlib.rpc.tls import Security


def config(tmp_path: Path) -> DaemonConfig:
    return DaemonConfig(tmp_path / "state", f"sqlite:///{tmp_path / 'mdb.sqlite'}",
                        HerdConfig(imageserver="127.0.0.1:1", mdb_check_interval=0.05),
                        None, 0, 0, "127.0.0.1", "token", Security(None))


async def test_a_dead_herd_task_stops_the_daemon_with_its_reason(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    server = Server(config(tmp_path))

    async def break_the_herd() -> None:
        while server.herd is None:
            await asyncio.sleep(0.01)
        server.herd.mdb = None  # type: ignore[assignment]  # a bug: not an MDB error

    breaking = asyncio.create_task(break_the_herd())
    with caplog.at_level(logging.CRITICAL), pytest.raises(FleetError) as raised:
        await asyncio.wait_for(run_server(server), 30)
    await breaking
    assert "task 'herd' died: AttributeError" in str(raised.value)
    assert any(record.levelno == logging.CRITICAL and "herd" in record.getMessage()
               for record in caplog.records)


async def test_a_stop_is_no_failure(tmp_path: Path) -> None:
    server = Server(config(tmp_path))
    await server.startup()
    await server.shutdown()
    assert server.failure == ""
