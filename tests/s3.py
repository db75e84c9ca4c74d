"""The S3 server of the tests: `bench/s3_loopback.py`'s moto server on loopback (one helper for tests and
benchmarks). Code under test reaches it only through the standard environment variables, as it would a
real object store; `environment(server)` exports them to this process too."""

from bench.s3_loopback import ACCESS_KEY, REGION, SECRET_KEY, S3Server, environment, start_s3_server

__all__ = ["ACCESS_KEY", "REGION", "SECRET_KEY", "S3Server", "environment", "start_s3_server"]
