"""The dominator's cache of images from the image server. Images are immutable,
so a cached one stays right until it is deleted; a missing one is asked for
again after a short while (it may be being uploaded)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Collection

import grpc

from fleetlib.errors import UnavailableError
from fleetlib.fstree.image import Image
from fleetlib.rpc.status import describe_rpc_error
from fleetlib.rpc.tls import Security
from fleetlib.suggest import close_matches
from imageserver.client import ImageServerClient

log = logging.getLogger(__name__)

MISSING_RETRY_SECONDS = 2.0


class ImageCache:
    """Least-recently-used images by name, fetched on demand."""

    def __init__(self, address: str, security: Security, capacity: int = 32) -> None:
        self.address = address
        self.security = security
        self.capacity = capacity
        self._images: OrderedDict[str, Image] = OrderedDict()
        self._missing: dict[str, float] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._client: ImageServerClient | None = None
        self._connecting = threading.Lock()  # worker threads share one connection

    def _connection(self) -> ImageServerClient:
        with self._connecting:
            if self._client is None:
                self._client = ImageServerClient(self.address, self.security)
            return self._client

    def _fetch(self, name: str) -> Image | None:
        try:
            return self._connection().get_image(name)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    async def get(self, name: str) -> Image | None:
        """The image, or None when the image server does not hold it (yet)."""
        image = self._images.get(name)
        if image is not None:
            self._images.move_to_end(name)
            return image
        if time.monotonic() < self._missing.get(name, 0.0):
            return None
        async with self._locks.setdefault(name, asyncio.Lock()):
            if name in self._images:
                return self._images[name]
            image = await asyncio.to_thread(self._fetch, name)
            if image is None:
                self._missing[name] = time.monotonic() + MISSING_RETRY_SECONDS
                return None
            self._missing.pop(name, None)
            self._images[name] = image
            while len(self._images) > self.capacity:
                self._images.popitem(last=False)
            return image

    def unknown(self, names: Collection[str]) -> dict[str, list[str]]:
        """Of `names`, those the image server does not hold, each with the most similar
        names it holds (for 'did you mean'); UnavailableError when it cannot answer.
        Asks the server, not the cache: a cached image may have been deleted since.
        Blocking: call it from a worker thread."""
        client = self._connection()
        try:
            missing = [name for name in sorted(set(names)) if not client.image_exists(name)]
            held = [summary.name for summary in client.list_images()] if missing else []
        except grpc.RpcError as err:
            log.warning("cannot check images %s on the image server %s: %s",
                        ", ".join(sorted(set(names))), self.address, describe_rpc_error(err))
            code = err.code().name.lower().replace("_", " ") if hasattr(err, "code") else "?"
            raise UnavailableError(f"the dominator cannot ask the image server {self.address} "
                                   f"whether the image exists ({code}): retry, or use "
                                   f"--force to set it unchecked") from None
        return {name: close_matches(name, held) for name in missing}

    def close(self) -> None:
        """Close the connection."""
        if self._client is not None:
            self._client.close()
