"""A real S3-compatible server (moto's server mode) on loopback, optionally behind a counting proxy.

Code under test reaches it only through the standard environment variables (`AWS_ENDPOINT_URL_S3`,
`FSSPEC_S3_ENDPOINT_URL`, credentials), exactly as it would reach a real object store. The proxy
(`start_s3_server(proxy=True)`) is what `bench stream` measures reads with: it forwards every request to
moto after an injected per-request latency (object storage's time to first byte), and counts requests
and response body bytes per (method, path). It runs one thread per client connection, at most
`MAX_CONNECTIONS` at once (further connections wait to be accepted), and idle keep-alive connections
are dropped after `IDLE_TIMEOUT_S`, so its threads stay bounded and `stop()` ends them all.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import os
import socket
import socketserver
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import fsspec
import fsspec.config

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"
MAX_CONNECTIONS = 256
IDLE_TIMEOUT_S = 5.0
CHUNK_BYTES = 1 << 20
# per-connection headers, never forwarded (RFC 9110 7.6.1); bodies are re-framed with Content-Length
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}


@dataclass
class Traffic:
    """Requests and response body bytes of one (method, path)."""

    requests: int = 0
    body_bytes: int = 0


class CountingProxy(ThreadingHTTPServer):
    """HTTP/1.1 reverse proxy to `upstream` (host, port) with `latency_s` slept before each request."""

    daemon_threads = True

    def __init__(self, upstream: tuple[str, int], latency_s: float = 0.0) -> None:
        super().__init__(("127.0.0.1", 0), _ForwardHandler)
        self.upstream, self.latency_s = upstream, latency_s
        self._lock = threading.Lock()
        self._traffic: dict[tuple[str, str], Traffic] = defaultdict(Traffic)
        self._in_flight = 0
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._connections: set[socket.socket] = set()
        self._handlers: set[threading.Thread] = set()
        self._thread = threading.Thread(target=self.serve_forever, name=self.name, daemon=True)

    @property
    def name(self) -> str:
        """Its threads' name: `s3-proxy-PORT` (accepting), `s3-proxy-PORT-conn` (one per connection)."""
        return f"s3-proxy-{self.server_address[1]}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def traffic(self) -> dict[tuple[str, str], Traffic]:
        """A copy of the counts so far: (method, path) -> Traffic."""
        with self._lock:
            return {k: Traffic(v.requests, v.body_bytes) for k, v in self._traffic.items()}

    def reset(self) -> None:
        with self._lock:
            self._traffic.clear()

    def wait_idle(self, timeout_s: float = 30.0) -> None:
        """Until no request is being served (a client's late requests are counted before a reset)."""
        deadline = time.monotonic() + timeout_s
        while self._in_flight and time.monotonic() < deadline:
            time.sleep(0.01)

    def count(self, method: str, path: str, body_bytes: int) -> None:
        with self._lock:
            entry = self._traffic[(method, path)]
            entry.requests += 1
            entry.body_bytes += body_bytes

    def request_started(self, delta: int) -> None:
        with self._lock:
            self._in_flight += delta

    # bounded threads: the accept loop waits for a free slot; each connection is tracked until it ends
    def process_request(self, request, client_address) -> None:
        self._slots.acquire()
        thread = threading.Thread(
            target=self._serve_connection,
            args=(request, client_address),
            name=f"{self.name}-conn",
            daemon=True,
        )
        with self._lock:
            self._connections.add(request)
            self._handlers.add(thread)
        thread.start()

    def _serve_connection(self, request, client_address) -> None:
        try:
            socketserver.ThreadingMixIn.process_request_thread(self, request, client_address)
        finally:
            with self._lock:
                self._connections.discard(request)
                self._handlers.discard(threading.current_thread())
            self._slots.release()

    def handle_error(self, request, client_address) -> None:
        pass  # a client that hung up mid-response (a cancelled read-ahead): nothing to report

    def start(self) -> CountingProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, end every open connection, and join the threads."""
        self.shutdown()
        self._thread.join()
        with self._lock:
            connections, handlers = list(self._connections), list(self._handlers)
        for conn in connections:
            with contextlib.suppress(OSError):  # already closed by its client
                conn.shutdown(socket.SHUT_RDWR)
        for thread in handlers:
            thread.join(timeout=IDLE_TIMEOUT_S)
        self.server_close()


class _ForwardHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients use it
    disable_nagle_algorithm = True  # headers and body are separate writes: no 40 ms delayed-ACK stall
    timeout = IDLE_TIMEOUT_S
    server: CountingProxy

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per request otherwise

    def finish(self) -> None:
        upstream = getattr(self, "_upstream", None)
        if upstream is not None:
            upstream.close()
        super().finish()

    def _connection(self) -> http.client.HTTPConnection:
        if getattr(self, "_upstream", None) is None:
            self._upstream = http.client.HTTPConnection(*self.server.upstream, timeout=120)
        return self._upstream

    def _request_body(self) -> bytes | None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(parts)
        length = int(self.headers.get("Content-Length", 0))
        return self.rfile.read(length) if length else None

    def _forward(self) -> None:
        self.server.request_started(+1)
        try:
            self._forward_one()
        finally:
            self.server.request_started(-1)

    def _forward_one(self) -> None:
        body = self._request_body()
        if self.server.latency_s > 0:
            time.sleep(self.server.latency_s)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP | {"expect"}}
        if body is not None:
            headers["Content-Length"] = str(len(body))
        try:
            response = self._send_upstream(headers, body)
        except (OSError, http.client.HTTPException):  # moto closed the kept-alive connection: once more
            self._upstream.close()
            self._upstream = None
            response = self._send_upstream(headers, body)
        self.send_response_only(response.status, response.reason)
        for key, value in response.getheaders():
            if key.lower() not in HOP_BY_HOP | {"content-length"}:
                self.send_header(key, value)
        sent = 0
        if self.command == "HEAD" or response.status in (204, 304):
            length = response.getheader("Content-Length")
            if length is not None:
                self.send_header("Content-Length", length)
            self.end_headers()
            response.read()
        elif (length := response.getheader("Content-Length")) is not None:
            self.send_header("Content-Length", length)
            self.end_headers()
            while chunk := response.read(CHUNK_BYTES):
                self.wfile.write(chunk)
                sent += len(chunk)
        else:  # moto sent no length: read it whole, send it with one
            data = response.read()
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            sent = len(data)
        self.wfile.flush()
        self.server.count(self.command, urlsplit(self.path).path, sent)

    def _send_upstream(self, headers: dict[str, str], body: bytes | None) -> http.client.HTTPResponse:
        conn = self._connection()
        conn.request(self.command, self.path, body=body, headers=headers)
        return conn.getresponse()

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward


@dataclass
class S3Server:
    """A running moto server (behind `proxy` when there is one). `endpoint_url`, `env` and
    `storage_options` are what clients use: the proxy's address when there is one; `direct_url` is
    moto's own, for setup traffic that should not be counted."""

    endpoint_url: str
    direct_url: str
    env: dict[str, str]
    storage_options: dict[str, object]
    proxy: CountingProxy | None = None
    _server: object = field(default=None, repr=False)  # moto's ThreadedMotoServer

    def filesystem(self, *, direct: bool = False) -> fsspec.AbstractFileSystem:
        options = {**self.storage_options, **({"endpoint_url": self.direct_url} if direct else {})}
        return fsspec.filesystem("s3", skip_instance_cache=True, **options)

    def make_bucket(self, name: str) -> str:
        """Create bucket `name` (idempotent); returns `s3://name`."""
        fs = self.filesystem(direct=True)
        if not fs.exists(name):
            fs.mkdir(name)
        return f"s3://{name}"

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        self._server.stop()


def start_s3_server(*, proxy: bool = False, latency_s: float = 0.0) -> S3Server:
    """moto on a free loopback port; with `proxy`, clients are pointed at a CountingProxy in front of it."""
    from moto.server import ThreadedMotoServer  # here: GPU machines running other benches have no moto

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    direct = f"http://{host}:{port}"
    front = CountingProxy((host, port), latency_s).start() if proxy else None
    url = front.url if front is not None else direct
    env = {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL_S3": url,
        "FSSPEC_S3_ENDPOINT_URL": url,
    }
    options = {"endpoint_url": url, "key": ACCESS_KEY, "secret": SECRET_KEY}
    return S3Server(url, direct, env, options, front, server)


class environment:
    """Context manager: export the server's env to this process too (fsspec reads its env config only
    at import, so its in-memory config is updated as well); restores both on exit."""

    def __init__(self, server: S3Server):
        self.server = server

    def __enter__(self) -> S3Server:
        self._saved_env = {k: os.environ.get(k) for k in self.server.env}
        self._saved_conf = fsspec.config.conf.get("s3")
        os.environ.update(self.server.env)
        fsspec.config.conf["s3"] = {**(self._saved_conf or {}), "endpoint_url": self.server.endpoint_url}
        return self.server

    def __exit__(self, *exc: object) -> None:
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if self._saved_conf is None:
            fsspec.config.conf.pop("s3", None)
        else:
            fsspec.config.conf["s3"] = self._saved_conf
