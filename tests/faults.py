"""A TCP proxy on loopback that breaks real connections on demand: what a client sees when S3 or the MLflow
server drops out (connections reset, refused, cut in the middle of a response), without mocking the client."""

from __future__ import annotations

import socket
import threading


class FaultyProxy:
    """Forwards 127.0.0.1:<port> to `target` ("host:port"). Modes, switchable at any time:

    pass             forward everything
    reset            accept, then close at once (the client sees a dropped connection)
    cut_after=N      forward, but close each connection after N bytes of response (a read broken mid-body);
                     `cuts` limits how many connections are cut before it passes again
    cut_matching     forward, but when a request contains `match` (say b".jsonl"), close the connection N
                     bytes into its response: a GET of a log file broken mid-body, `cuts` times
    """

    def __init__(self, target: str):
        host, port = target.rsplit(":", 1)
        self.target = (host.removeprefix("http://"), int(port))
        self.mode, self.cut_after, self.cuts, self.match, self.then = "pass", 0, 0, b"", "pass"
        self.broken = 0  # connections this proxy broke
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True, name="faulty-proxy").start()

    def set(self, mode: str, cut_after: int = 0, cuts: int = 1_000_000, match: bytes = b"", then: str = "pass"
            ) -> None:
        """Switch mode; a cutting mode goes to `then` once its `cuts` are used."""
        with self._lock:
            self.mode, self.cut_after, self.cuts, self.match, self.then = mode, cut_after, cuts, match, then

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                mode, limit = self.mode, self.cut_after
                if mode == "cut_matching":
                    pass  # decided per request, in _watch
                elif mode != "pass" and self.cuts > 0:
                    self.cuts -= 1
                    self.broken += 1
                else:
                    mode = "pass"
            if mode == "reset":
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            conn = {"limit": limit if mode == "cut_after" else None, "sent": 0}
            threading.Thread(target=self._pipe, args=(client, upstream, None, conn), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, conn, None), daemon=True).start()

    def _watch(self, request: bytes, conn: dict) -> None:
        """A request on its way: arm a cut of its response if it matches."""
        with self._lock:
            if self.mode == "cut_matching" and self.cuts > 0 and self.match in request:
                self.cuts -= 1
                self.broken += 1
                conn["limit"], conn["sent"] = self.cut_after, 0
                if self.cuts == 0:
                    self.mode, self.cuts = self.then, 1_000_000

    def _pipe(self, src: socket.socket, dst: socket.socket, response: dict | None, request: dict | None) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if request is not None:  # client -> server
                    self._watch(data, request)
                elif response["limit"] is not None:  # server -> client, to be cut
                    room = response["limit"] - response["sent"]
                    if len(data) > room:
                        dst.sendall(data[:room])
                        break
                    response["sent"] += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self._server.close()
