"""`bench stream`'s measuring parts: the counting proxy in front of moto (`bench/s3_loopback.py`), and
the issue-22 goals its count pass checks at W = 1 and 4 on the embedded sample's shards."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from bench import stream
from bench.s3_loopback import environment, start_s3_server
from pipeline.data import DataConfig


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


def _image_bytes(shards: Path) -> int:
    """Bytes of the image members of a shard folder, from its `.idx` files: a floor for what any reader
    of the whole split fetches (so a proxy that counted nothing fails the test)."""
    total = 0
    for index in shards.glob("*.idx"):
        for line in index.read_text().splitlines()[1:]:
            parts = line.split()
            total += sum(int(parts[i + 2]) for i in range(0, len(parts), 4) if parts[i] == "jpg")
    return total


@pytest.mark.parametrize("backend", ["cpu", "torch", "dali"])
@pytest.mark.parametrize("world_size", [1, 4])
def test_an_epoch_fetches_each_shard_byte_about_once_in_few_requests(
    proxied, sample_shards, backend, world_size
):
    """Issue 22's goals at the embedded sample's size (8 shards of 250): summed over the ranks, bytes
    fetched <= 1.05x the bytes of the shards read and <= 1.05x the split's shard bytes, also for the worst
    rank alone; at most one GET per 50 samples delivered."""
    url = stream.upload(proxied, sample_shards, f"goals-{backend}-{world_size}")
    cfg = DataConfig(**stream.loader_config(url, backend, batch_size=16, workers=1))
    shard_bytes = stream.split_shard_bytes(sample_shards)
    counts = stream.count_epoch(proxied, cfg, shard_bytes, world_size, list(range(world_size)))

    assert counts["samples"] == 2000 // (16 * world_size) * 16 * world_size
    assert counts["bytes_fetched"] >= _image_bytes(sample_shards) * counts["samples"] / 2000
    assert counts["fetched_per_shard_byte_read"] <= 1.05, counts
    assert counts["worst_rank_fetched_per_shard_byte_read"] <= 1.05, counts
    assert counts["fetched_per_split_byte"] <= 1.05, counts
    assert counts["gets_per_sample"] <= 0.02, counts
