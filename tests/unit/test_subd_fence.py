"""subd's fence file: the highest lease token, its checks, and a corrupt file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from fleetlib.errors import FleetError, PreconditionError, UnavailableError
from fleetlib.wire import subd_pb2
from subd.fence import FENCE_FILE, Fences, FenceToken, fence_of

A5, A6 = FenceToken("dominator-a", 5), FenceToken("dominator-a", 6)
B4, B5 = FenceToken("dominator-b", 4), FenceToken("dominator-b", 5)


def test_tokens_only_rise_and_survive_a_restart(tmp_path: Path) -> None:
    fences = Fences.in_dir(tmp_path)
    assert fences.highest is None and fences.to_proto() is None
    fences.admit(A5, "fetch")
    with pytest.raises(PreconditionError) as refused:
        fences.admit(B4, "update")
    assert str(refused.value) == ("fenced: token 4 from dominator-b is older than 5 from "
                                  "dominator-a (a newer owner holds this host's shard)")
    fences.admit(A5, "update")  # the same lease
    with pytest.raises(PreconditionError, match="token 5 from dominator-b is held by "
                                                "dominator-a"):
        fences.admit(B5, "update")
    assert fences.refused == 2
    fences.admit(A6, "cleanup")
    assert json.loads((tmp_path / FENCE_FILE).read_text()) == {"owner": "dominator-a",
                                                               "token": 6}
    assert (tmp_path / FENCE_FILE).stat().st_mode & 0o777 == 0o600
    again = Fences.in_dir(tmp_path)
    assert again.highest == A6 and again.error == ""
    with pytest.raises(PreconditionError):
        again.check(A5, "fetch")


def test_unfenced_calls_pass_and_are_logged_once_a_token_was_seen(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fences = Fences.in_dir(tmp_path)
    with caplog.at_level(logging.INFO, logger="subd.fence"):
        fences.admit(None, "fetch")
        assert "unfenced" not in caplog.text
        fences.admit(A5, "fetch")
        fences.admit(None, "update")
    assert "unfenced update accepted" in caplog.text and fences.highest == A5


def test_required_fences_refuse_unfenced_calls_only(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fences = Fences.in_dir(tmp_path, require=True)
    with caplog.at_level(logging.WARNING, logger="subd.fence"):
        with pytest.raises(PreconditionError) as refused:
            fences.admit(None, "update")
    message = str(refused.value)
    assert message == ("unfenced: update without a fence refused (subd runs with "
                       "--require-fence: only a dominator holding this host's lease may "
                       "change it)")
    assert not message.startswith("fenced: ")  # not a newer owner's: the herd's is_fenced
    assert message in caplog.text
    assert (fences.unfenced_refused, fences.refused, fences.highest) == (1, 0, None)
    assert not (tmp_path / FENCE_FILE).exists()
    fences.admit(A5, "fetch")  # fenced calls go on as without the option
    with pytest.raises(PreconditionError, match="^fenced: token 4"):
        fences.check(B4, "update")
    with pytest.raises(PreconditionError, match="^unfenced: cleanup"):
        fences.check(None, "cleanup")
    assert (fences.unfenced_refused, fences.refused, fences.highest) == (2, 1, A5)
    assert Fences.in_dir(tmp_path).require is False  # the default accepts them


@pytest.mark.parametrize("content", [b"", b"{not json", b'{"owner": "a"}', b"[1, 2]",
                                     b'{"owner": "a", "token": true}',
                                     b'{"owner": "", "token": 3}',
                                     b'{"owner": "a", "token": -1}', b"\xff\xfe"])
def test_a_corrupt_file_is_kept_aside_and_the_next_token_rules(
        tmp_path: Path, content: bytes) -> None:
    (tmp_path / FENCE_FILE).write_bytes(content)
    fences = Fences.in_dir(tmp_path)
    assert fences.to_proto() is None and "unreadable" in fences.error
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(f"{FENCE_FILE}.corrupt-")]
    assert len(aside) == 1 and aside[0].read_bytes() == content
    assert not (tmp_path / FENCE_FILE).exists()
    fences.admit(B4, "fetch")
    assert fences.highest == B4 and fences.error == ""
    with pytest.raises(PreconditionError):
        fences.admit(FenceToken("dominator-c", 3), "fetch")


def test_an_unreadable_file_is_lost_not_fatal(tmp_path: Path) -> None:
    (tmp_path / FENCE_FILE).mkdir()  # EISDIR: reading fails
    fences = Fences.in_dir(tmp_path)
    assert fences.highest is None and "unreadable" in fences.error


def test_a_token_that_cannot_be_recorded_is_refused(tmp_path: Path) -> None:
    fences = Fences.in_dir(tmp_path)
    fences.admit(A5, "fetch")
    (tmp_path / FENCE_FILE).unlink()
    (tmp_path / FENCE_FILE / "x").mkdir(parents=True)  # the rename fails, even for root
    with pytest.raises(UnavailableError, match="cannot record fencing token 6 from "
                                               "dominator-a: Is a directory"):
        fences.admit(A6, "fetch")
    fences.admit(A5, "fetch")  # the recorded one needs no write
    assert fences.highest == A5
    assert [p.name for p in tmp_path.iterdir()] == [FENCE_FILE]  # no temporary left


def test_fence_of_validates_what_the_wire_carries() -> None:
    assert fence_of(subd_pb2.FetchRequest()) is None
    assert fence_of(subd_pb2.CleanupRequest(fence=A5.to_proto())) == A5
    for bad, message in [(subd_pb2.Fence(token=3), "without an owner"),
                         (subd_pb2.Fence(owner="a"), "without a token"),
                         (subd_pb2.Fence(owner="a" * 300, token=1), "longer than")]:
        with pytest.raises(FleetError, match=message):
            fence_of(subd_pb2.Configuration(fence=bad))
