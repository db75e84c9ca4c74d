"""`bench stream`'s measuring parts: the counting proxy in front of moto (`bench/s3_loopback.py`), and
the issue-22 goals its count pass checks at W = 1 and 4 on the embedded sample's shards."""

from __future__ import annotations

import threading
import time

import pytest

from bench.s3_loopback import environment, start_s3_server


@pytest.fixture(scope="module")
def proxied():
    server = start_s3_server(proxy=True)
    try:
        with environment(server):
            yield server
    finally:
        server.stop()


def test_proxy_counts_each_request_and_its_bytes_and_adds_the_latency(proxied):
    proxied.make_bucket("proxied")
    proxied.filesystem(direct=True).pipe("proxied/blob", bytes(range(256)) * 4096)  # 1 MiB, not counted
    fs = proxied.filesystem()
    proxied.proxy.reset()
    assert fs.cat_file("proxied/blob", start=1000, end=1100) == (bytes(range(256)) * 4096)[1000:1100]
    assert fs.cat_file("proxied/blob") == bytes(range(256)) * 4096
    traffic = proxied.proxy.traffic()
    assert traffic[("GET", "/proxied/blob")].requests == 2
    assert traffic[("GET", "/proxied/blob")].body_bytes == 100 + (1 << 20)
    assert all(method != "PUT" for method, _ in traffic)

    proxied.proxy.latency_s = 0.2
    try:
        start = time.perf_counter()
        fs.cat_file("proxied/blob", start=0, end=10)
        assert time.perf_counter() - start >= 0.2
    finally:
        proxied.proxy.latency_s = 0.0


def test_stop_ends_every_proxy_thread_though_clients_keep_their_connections_open():
    server = start_s3_server(proxy=True)
    server.make_bucket("stopping")
    fs = server.filesystem()
    fs.ls("stopping")  # s3fs keeps this connection open (keep-alive), its handler thread waiting on it

    def proxy_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith(server.proxy.name)]

    assert len(proxy_threads()) >= 2  # the accepting thread and one per open connection
    start = time.perf_counter()
    server.stop()
    assert not proxy_threads()
    assert time.perf_counter() - start < 3  # closed, not waited out (idle connections last 5 s)
