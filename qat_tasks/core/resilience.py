"""Transient failures of S3 and the MLflow server: retried with exponential backoff, and when they outlast the
retries, one clear error that names the service, the attempts and what to do.

- S3 (boto3): standard retry mode (throttling, 5xx, connection errors) with `retries.attempts` attempts and
  connect/read timeouts of `retries.timeout_s`; a streamed read that breaks mid-file resumes at the byte it
  reached (`ResumableBody`, HTTP Range pinned to the object's ETag), so no line is read twice or lost.
- MLflow (REST to a tracking server): its client's own urllib3 retries, set from the same policy through
  MLflow's environment variables (`MLFLOW_HTTP_REQUEST_MAX_RETRIES`, `..._BACKOFF_FACTOR`, `..._TIMEOUT`);
  a variable already set in the environment wins, so an operator can tune one service without a config change.
- Above both, Airflow retries the whole task (`scheduling.task_retries`, exponential delay); every stage is
  keyed by its DAG run, so a retry reuses what finished.
"""

from __future__ import annotations

import io
import logging
import os
import random
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5  # tries in all, the first included
    backoff_s: int = 1  # first wait; doubles each time, with jitter (MLflow takes whole seconds)
    max_backoff_s: float = 30.0
    timeout_s: float = 60.0  # connect and read timeout of one HTTP request

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed try number `attempt` (1-based): exponential, full jitter."""
        return random.uniform(0, min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)))


_policy = RetryPolicy()


def configure(attempts: int, backoff_s: int, max_backoff_s: float, timeout_s: float) -> RetryPolicy:
    """Make the policy the one S3 clients created from now on use, and give it to MLflow's HTTP client."""
    global _policy
    _policy = RetryPolicy(attempts, backoff_s, max_backoff_s, timeout_s)
    for var, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", attempts - 1),
                       ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", backoff_s),
                       ("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", min(backoff_s, 1.0)),
                       ("MLFLOW_HTTP_REQUEST_TIMEOUT", int(timeout_s))):
        if os.environ.get(var) in (None, _ours.get(var)):  # unset, or set by us: ours to change
            os.environ[var] = _ours[var] = str(value)
    return _policy


_ours: dict[str, str] = {}


def policy() -> RetryPolicy:
    return _policy


def boto_config():
    from botocore.config import Config

    p = _policy
    return Config(retries={"total_max_attempts": p.attempts, "mode": "standard"}, connect_timeout=p.timeout_s,
                  read_timeout=p.timeout_s)


def _stream_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import (
        ConnectionClosedError,
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
    )
    from urllib3.exceptions import ProtocolError
    from urllib3.exceptions import ReadTimeoutError as UrlReadTimeout

    return (ResponseStreamingError, IncompleteReadError, ConnectionClosedError, ReadTimeoutError, ProtocolError,
            UrlReadTimeout,
            ConnectionError, TimeoutError)


class S3StreamError(ConnectionError):
    """A streamed S3 read that broke and could not resume."""

    def __init__(self, endpoint_url: str | None, message: str):
        super().__init__(message)
        self.endpoint_url = endpoint_url


class ResumableBody(io.RawIOBase):
    """A read-only raw file object over one S3 object that survives a broken connection: a failed read reopens the
    object at the byte reached (Range + IfMatch on the ETag, so a replaced object fails loudly instead of
    splicing two versions) with the policy's backoff, up to its attempts."""

    def __init__(self, client, bucket: str, key: str):
        super().__init__()
        self.client, self.bucket, self.key = client, bucket, key
        self.pos, self.resumed = 0, 0
        resp = client.get_object(Bucket=bucket, Key=key)
        self.etag, self.size, self._body = resp["ETag"], resp["ContentLength"], resp["Body"]

    def read(self, n: int = -1) -> bytes:
        errors = _stream_errors()
        failures = 0
        while True:
            try:
                data = self._body.read(n) if n is not None and n >= 0 else self._body.read()
                self.pos += len(data)
                if not data and self.pos < self.size:  # the server closed the stream early
                    raise ConnectionError(f"stream ended at byte {self.pos} of {self.size}")
                return data
            except errors as exc:
                failures += 1
                if failures >= _policy.attempts:
                    raise S3StreamError(self.client.meta.endpoint_url, f"s3://{self.bucket}/{self.key}: read broke at byte {self.pos} of "
                                          f"{self.size} and did not resume after {failures} tries: {exc}") from exc
                wait = _policy.delay(failures)
                log.warning("s3://%s/%s: read broke at byte %d of %d (%s); resuming in %.1f s", self.bucket,
                            self.key, self.pos, self.size, type(exc).__name__, wait)
                time.sleep(wait)
                self._reopen()

    def _reopen(self) -> None:
        try:
            self._body.close()
        except Exception:
            pass
        resp = self.client.get_object(Bucket=self.bucket, Key=self.key, Range=f"bytes={self.pos}-",
                                      IfMatch=self.etag)
        self._body = resp["Body"]
        self.resumed += 1

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


class ServiceUnavailableError(RuntimeError):
    """S3 or the MLflow server did not answer through every retry: the task fails with this message; the
    stage's finished work is kept (docs/operations.md), so clearing the task reruns only what is left."""


def explain(exc: BaseException, stage: str) -> BaseException:
    """`exc` itself, or, when it says S3 or the MLflow server was out of reach through every retry, a
    ServiceUnavailableError that says so in the user's terms (the original chained)."""
    service = unavailable(exc)
    if service is None:
        return exc
    p, cause = _policy, str(exc)[:300].rstrip(".")
    err = ServiceUnavailableError(
        f"{stage}: {service} did not answer after {p.attempts} tries with backoff (up to {p.max_backoff_s:g} s "
        f"between tries): {type(exc).__name__}: {cause}. Nothing this stage finished is lost: once the service "
        f"is back, clear the task (Airflow retries it by itself first) and it reuses that work.")
    err.__cause__ = exc
    return err


def unavailable(exc: BaseException) -> str | None:
    """Which service an exception says is out of reach ("S3 at ...", "the MLflow server at ..."), or None
    when the error is something else (a bug, bad data), which must surface as it is."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError  # connection closed, read timeout, ...
    from requests.exceptions import ConnectionError as RequestsConnectionError
    from requests.exceptions import RetryError, Timeout

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, S3StreamError):
            return f"S3 at {exc.endpoint_url}" if exc.endpoint_url else "S3"
        if isinstance(exc, BotoConnectionError | HTTPClientError):
            from urllib.parse import urlsplit

            url = urlsplit(getattr(exc, "kwargs", {}).get("endpoint_url", ""))
            return f"S3 at {url.scheme}://{url.netloc}" if url.netloc else "S3"
        if isinstance(exc, RequestsConnectionError | RetryError | Timeout):
            return "the MLflow server"
        text = str(exc)
        if "API request to" in text and ("Max retries exceeded" in text or "Connection" in text):
            from urllib.parse import urlsplit

            url = urlsplit(text.split("API request to ", 1)[1].split(" ", 1)[0])
            return f"the MLflow server at {url.scheme}://{url.netloc}"
        exc = exc.__cause__ or exc.__context__
    return None
