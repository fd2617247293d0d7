"""Messages between the host, the supervisor and the worker. A frame is a 4-byte header length, an 8-byte body
length, the header and the body. The host sends marshal headers (the sandbox trusts the host); the sandbox sends
repr() headers, which the host reads with ast.literal_eval and never unmarshals, and raw bytes (files) in the body.
The sandboxed side imports neither json nor ast, to start fast."""

from __future__ import annotations

import os

LIMIT_NAMES = ("cpu", "memory", "processes", "file_size", "open_files", "disk")  # what a worker's hint may name


def frame(header: bytes, body: bytes = b"") -> bytes:
    return len(header).to_bytes(4, "big") + len(body).to_bytes(8, "big") + header + body


class Frames:
    """Cuts a byte stream into (header, body) frames; a frame over `limit` bytes is a protocol error."""

    def __init__(self, limit: int) -> None:
        self.buffer = bytearray()
        self.limit = limit
        self.ready: list[tuple[bytes, bytes]] = []

    def feed(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 12:
            head, body = int.from_bytes(self.buffer[:4], "big"), int.from_bytes(self.buffer[4:12], "big")
            if head + body > self.limit:
                raise ValueError(f"a {head + body}-byte message exceeds the {self.limit}-byte limit")
            if len(self.buffer) < 12 + head + body:
                return
            self.ready.append((bytes(self.buffer[12 : 12 + head]), bytes(self.buffer[12 + head : 12 + head + body])))
            del self.buffer[: 12 + head + body]


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def receive(fd: int, frames: Frames) -> tuple[bytes, bytes] | None:
    """The next frame from a blocking fd, or None at end of file."""
    while not frames.ready:
        data = os.read(fd, 1 << 16)
        if not data:
            return None
        frames.feed(data)
    return frames.ready.pop(0)


def send(fd: int, message: dict, body: bytes = b"") -> None:
    write_all(fd, frame(repr(message).encode(), body))
