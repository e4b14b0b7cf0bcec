"""Chunked messages: cutting at top-level field boundaries and parsing piece by piece
gives exactly what one FromString gives; malformed input is a one-line FleetError."""

from __future__ import annotations

import pytest

from fleetlib.errors import FleetError
from fleetlib.rpc.chunks import field_pieces, join_chunks, parse_in_pieces, split_message
from fleetlib.wire import tree_pb2


def sample_tree(count: int) -> tree_pb2.Tree:
    msg = tree_pb2.Tree(root=1)
    msg.inodes.add(number=1, kind=tree_pb2.DIRECTORY, mode=0o755)
    entries = msg.directories.add(inode=1).entries
    for n in range(2, count + 2):
        msg.inodes.add(number=n, kind=tree_pb2.REGULAR, mode=0o644, size=n,
                       hash=bytes(32), mtime_ns=-n,
                       xattrs=[tree_pb2.Xattr(name=b"user.x", value=b"v" * (n % 300))])
        entries.add(name=b"file-%d" % n, inode=n)
    return msg


def test_pieces_parse_to_the_same_message() -> None:
    msg = sample_tree(20_000)
    data = msg.SerializeToString()
    pieces = list(field_pieces(data, size=4096))
    assert len(pieces) > 100 and b"".join(pieces) == data
    assert all(tree_pb2.Tree.FromString(piece) is not None for piece in pieces)
    assert parse_in_pieces(tree_pb2.Tree, data) == msg
    assert parse_in_pieces(tree_pb2.Tree, b"") == tree_pb2.Tree()
    assert parse_in_pieces(tree_pb2.Tree, join_chunks(split_message(data))) == msg


def test_pieces_end_between_fields_never_inside_one() -> None:
    msg = tree_pb2.Tree(root=7, inodes=[tree_pb2.Inode(number=1, symlink_target=b"t" * 5000)])
    data = msg.SerializeToString()
    assert [len(p) for p in field_pieces(data, size=1)] == [2, len(data) - 2]


@pytest.mark.parametrize("data", [b"\x12\x05abc", b"\x12", b"\x08\xff", b"\x0f",
                                  b"\x12" + b"\xff" * 11, b"\x12\x02\xff\xff"])
def test_malformed_input_is_a_fleet_error(data: bytes) -> None:
    with pytest.raises(FleetError, match="malformed"):
        parse_in_pieces(tree_pb2.Tree, data)
