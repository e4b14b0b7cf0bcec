"""The dominator's cache of images from the image server. Images are immutable,
so a cached one stays right until it is deleted; a missing one is asked for
again after a short while (it may be being uploaded)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

import grpc

from fleetlib.fstree.image import Image
from fleetlib.rpc.tls import Security
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

    def _fetch(self, name: str) -> Image | None:
        if self._client is None:
            self._client = ImageServerClient(self.address, self.security)
        try:
            return self._client.get_image(name)
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

    def close(self) -> None:
        """Close the connection."""
        if self._client is not None:
            self._client.close()
