"""A TCP proxy of our own between a client and a store server on 127.0.0.1, that a test cuts and restores: cut, it
resets every connection (what a client sees when a server stops: `Connection reset by peer`, then `Could not
connect`) while the server keeps its data. Tests restore it on events (a request it refused), never after a sleep."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable


class CutProxy:
    """A TCP proxy on 127.0.0.1 to moto's port. `cut()` resets every open connection, and, until `restore()`,
    every new one once its request line is read: `refused` lists those lines (what the client kept trying), and
    `restore_when(refused)`, checked after each, restores the proxy from inside it (no sleeping test). `cut_on`
    cuts it from inside too, as soon as a client sends those bytes (a request for a given key)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.refused: list[str] = []
        self.restore_when: Callable[[list[str]], bool] | None = None
        self.cut_on: bytes | None = None
        self.restored = threading.Event()
        self._cut = threading.Event()
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="cut-proxy", daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut(self) -> None:
        self.restored.clear()
        self._cut.set()
        with self._lock:
            for s in self._open:
                _reset(s)
            self._open.clear()

    def restore(self) -> None:
        self._cut.clear()
        self.restored.set()

    def close(self) -> None:
        self.listener.close()
        self.cut()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        if self._cut.is_set():
            self._refuse(client)
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        except OSError:
            _reset(client)
            return
        with self._lock:
            if self._cut.is_set():  # cut while this one was connecting
                _reset(client)
                _reset(upstream)
                return
            self._open |= {client, upstream}
        pumps = [2]  # the second pump to end closes both sockets: a long run through the proxy keeps no descriptors
        threading.Thread(target=self._pump, args=(client, upstream, True, pumps), daemon=True).start()
        threading.Thread(target=self._pump, args=(upstream, client, False, pumps), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_client: bool, pumps: list[int]) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if from_client and self.cut_on is not None and self.cut_on in data:
                    self.cut_on = None
                    self.cut()  # this connection too, before the request reaches the server
                    return
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        with self._lock:
            pumps[0] -= 1
            last = pumps[0] == 0
            if last:
                self._open -= {src, dst}
        if last:
            src.close()
            dst.close()

    def _refuse(self, client: socket.socket) -> None:
        client.settimeout(5)
        head = b""
        with contextlib.suppress(OSError):
            while b"\r\n" not in head and len(head) < 65536:
                data = client.recv(65536)
                if not data:
                    break
                head += data
        _reset(client)
        with self._lock:
            self.refused.append(head.split(b"\r\n", 1)[0].decode(errors="replace"))
            if self.restore_when is not None and self.restore_when(self.refused):
                self.restore()


def _reset(s: socket.socket) -> None:
    """Close with a TCP reset, as a stopped server's host answers. The shutdown wakes a pump blocked reading it
    (a plain close would leave the connection open until that read returns)."""
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RD)
    with contextlib.suppress(OSError):
        s.close()
