"""The server a replica follows (`imageserver --replicate-from HOST:PORT`): one channel
to it shared by replication, pull-through and write-through, and what its hello said
about the master."""

from __future__ import annotations

import logging

from fleetlib.rpc.tls import Security, open_channel
from fleetlib.wire import imageserver_pb2_grpc, objectserver_pb2_grpc

log = logging.getLogger(__name__)

# How far ahead of our reading upstream may send on one stream (gRPC's default is
# 64 KiB): replication's objects flow without waiting for a window update per piece,
# which on a busy machine each cost a scheduling delay.
LOOKAHEAD_BYTES = 16 << 20


class Upstream:
    """A replica's upstream: a master or another replica."""

    def __init__(self, address: str, security: Security) -> None:
        self.address = address
        self.channel = open_channel(address, security, "imageserver", aio=True, options=[
            ("grpc.http2.lookahead_bytes", LOOKAHEAD_BYTES)])
        self.images = imageserver_pb2_grpc.ImageServerStub(self.channel)
        self.objects = objectserver_pb2_grpc.ObjectServerStub(self.channel)
        # What the upstream's last hello said (replication fills it in).
        self.master_address = ""  # "" until known; the upstream itself when it is the master

    def master(self) -> str:
        """The master's HOST:PORT as best known, for messages that send the operator there."""
        return self.master_address or self.address

    async def close(self) -> None:
        """Close the channel (on shutdown)."""
        await self.channel.close()
