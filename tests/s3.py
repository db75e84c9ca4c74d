"""A real S3-compatible server (moto's server mode) on loopback, for tests that read or write `s3://`.

Code under test reaches it only through the standard environment variables (`AWS_ENDPOINT_URL_S3`,
`FSSPEC_S3_ENDPOINT_URL`, credentials), exactly as it would reach a real object store.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import fsspec
import fsspec.config
from moto.server import ThreadedMotoServer

from ports import free_port

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"


@dataclass
class S3Server:
    """A running moto server; `env` is what a subprocess needs, `storage_options` what fsspec needs."""

    endpoint_url: str
    env: dict[str, str]
    storage_options: dict[str, object]
    _server: ThreadedMotoServer = field(repr=False)

    def filesystem(self) -> fsspec.AbstractFileSystem:
        return fsspec.filesystem("s3", skip_instance_cache=True, **self.storage_options)

    def make_bucket(self, name: str) -> str:
        """Create bucket `name` (idempotent); returns `s3://name`."""
        fs = self.filesystem()
        if not fs.exists(name):
            fs.mkdir(name)
        return f"s3://{name}"

    def stop(self) -> None:
        self._server.stop()


def start_s3_server() -> S3Server:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL_S3": url,
        "FSSPEC_S3_ENDPOINT_URL": url,
    }
    options = {"endpoint_url": url, "key": ACCESS_KEY, "secret": SECRET_KEY}
    return S3Server(endpoint_url=url, env=env, storage_options=options, _server=server)


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
