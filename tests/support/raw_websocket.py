"""A WebSocket client on a bare socket, for what a well-behaved client library will not do:
send invalid UTF-8 in a text frame, keep sending while never reading, flood pings."""

from __future__ import annotations

import base64
import os
import socket
from typing import Any

import orjson
from websockets.frames import Frame, Opcode


class RawWebSocket:
    def __init__(self, port: int, receive_buffer: int = 4096, path: str = "/conversation") -> None:
        self.sock = socket.socket()
        # A small receive window, so a client that does not read stops the server's writes early.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            byte = self.sock.recv(1)
            assert byte, f"connection closed during the handshake: {head!r}"
            head += byte
        assert head.startswith(b"HTTP/1.1 101"), head
        self.buffer = b""

    @staticmethod
    def frame(opcode: Opcode, payload: bytes) -> bytes:
        return Frame(opcode, payload).serialize(mask=True, extensions=[])

    @classmethod
    def event(cls, event_type: str, **data: object) -> bytes:
        return cls.frame(Opcode.TEXT, orjson.dumps({"type": event_type, "data": data}))

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_frame(self, timeout: float = 10.0) -> tuple[Opcode, bytes]:
        """The next (unmasked) server frame."""
        self.sock.settimeout(timeout)
        while (length := self._frame_length(self.buffer)) is None or len(self.buffer) < length:
            chunk = self.sock.recv(65536)
            assert chunk, "connection closed"
            self.buffer += chunk
        frame, self.buffer = self.buffer[:length], self.buffer[length:]
        header = length - self._payload_length(frame)
        return Opcode(frame[0] & 0x0F), frame[header:]

    def read_event(self, timeout: float = 10.0) -> dict[str, Any]:
        opcode, payload = self.read_frame(timeout)
        assert opcode is Opcode.TEXT, (opcode, payload)
        event: dict[str, Any] = orjson.loads(payload)
        return event

    def read_close_code(self, timeout: float = 10.0) -> int:
        while True:
            opcode, payload = self.read_frame(timeout)
            if opcode is Opcode.CLOSE:
                return int.from_bytes(payload[:2], "big")

    @staticmethod
    def _payload_length(frame: bytes) -> int:
        size = frame[1] & 0x7F
        if size == 126:
            return int.from_bytes(frame[2:4], "big")
        if size == 127:
            return int.from_bytes(frame[2:10], "big")
        return size

    @classmethod
    def _frame_length(cls, buffer: bytes) -> int | None:
        if len(buffer) < 2:
            return None
        header = {126: 4, 127: 10}.get(buffer[1] & 0x7F, 2)
        return None if len(buffer) < header else header + cls._payload_length(buffer)

    def close(self) -> None:
        self.sock.close()
