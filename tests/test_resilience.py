"""Transient S3 and MLflow failures, made real: a TCP proxy (tests/faults.py) in front of the S3 server breaks
connections the way a network or a restarting service does; the clients are the real boto3 and MLflow ones."""

from __future__ import annotations

import gzip
import json

import pytest

from qat_tasks.core import resilience, storage

from .faults import FaultyProxy


@pytest.fixture()
def fast_retries():
    """A retry policy with short waits (restored after the test)."""
    saved = resilience.policy()
    resilience.configure(attempts=4, backoff_s=0, max_backoff_s=0.2, timeout_s=5)
    yield resilience.policy()
    resilience.configure(saved.attempts, saved.backoff_s, saved.max_backoff_s, saved.timeout_s)


@pytest.fixture()
def bucket(s3_endpoint):
    client = storage.s3_client(s3_endpoint)
    name = "resilience"
    if name not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        client.create_bucket(Bucket=name)
    return name


def _lines(n: int) -> bytes:
    return b"".join(json.dumps({"i": i, "text": f"where is my order #{i:06d}"}).encode() + b"\n" for i in range(n))


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_a_read_broken_mid_file_resumes_where_it_stopped(s3_endpoint, bucket, fast_retries, suffix):
    body = _lines(20_000)  # ~1 MB plain
    data = gzip.compress(body, mtime=0) if suffix.endswith(".gz") else body
    uri = f"s3://{bucket}/dt=2026-07-01/part{suffix}"
    storage.write_bytes(uri, data, s3_endpoint)
    proxy = FaultyProxy(s3_endpoint)
    try:
        proxy.set("cut_after", cut_after=len(data) // 3, cuts=2)  # the first two GETs break a third of the way
        got = b"".join(storage.open_lines(uri, proxy.url))
    finally:
        proxy.close()
    assert got == body  # every line once, none lost, none twice
    assert proxy.broken == 2


def test_a_transient_s3_outage_is_retried_and_a_lasting_one_fails_naming_s3(s3_endpoint, bucket, fast_retries):
    uri = f"s3://{bucket}/manifest.json"
    storage.write_bytes(uri, b'{"version": "v1"}', s3_endpoint)
    proxy = FaultyProxy(s3_endpoint)
    try:
        proxy.set("reset", cuts=2)  # two dropped connections, then the service is back
        assert storage.read_bytes(uri, proxy.url) == b'{"version": "v1"}'
        assert proxy.broken == 2
        proxy.set("reset")  # down for good
        with pytest.raises(Exception) as info:
            storage.read_bytes(uri, proxy.url)
        assert proxy.broken == 2 + fast_retries.attempts  # every try was made
    finally:
        proxy.close()
    err = resilience.explain(info.value, "calibration refresh")
    assert isinstance(err, resilience.ServiceUnavailableError) and err.__cause__ is info.value
    assert f"S3 at {proxy.url}" in str(err) and "4 tries" in str(err) and "clear the task" in str(err)


def test_an_unreachable_mlflow_server_is_named_and_other_errors_pass_through(monkeypatch):
    import socket

    from mlflow import MlflowClient

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    with pytest.raises(Exception) as info:
        MlflowClient(f"http://127.0.0.1:{port}").search_experiments()
    assert resilience.unavailable(info.value) == f"the MLflow server at http://127.0.0.1:{port}"
    bug = KeyError("calibration")
    assert resilience.explain(bug, "intent-classifier") is bug  # not an outage: surfaces as it is


def test_registry_lookups_say_none_only_when_the_registry_answers_none(monkeypatch, tmp_path):
    """'No such version' from a registry that answered means register or bootstrap; from one that did not answer
    it would mean a second version of the same stage, or a second champion. So an outage raises, named."""
    import socket

    from mlflow import MlflowClient

    from qat_tasks.core import registry

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert registry.find_version(store, "mangaassist-intent-classifier", "run:stage") is None
    assert registry.alias_version(store, "mangaassist-intent-classifier", registry.CHAMPION) is None
    store.create_registered_model("mangaassist-intent-classifier")
    assert registry.alias_version(store, "mangaassist-intent-classifier", registry.CHAMPION) is None

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    down = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}", registry_uri=f"http://127.0.0.1:{port}")
    for lookup in (lambda: registry.find_version(down, "mangaassist-intent-classifier", "run:stage"),
                   lambda: registry.alias_version(down, "mangaassist-intent-classifier", registry.CHAMPION),
                   lambda: registry.register(down, "mangaassist-intent-classifier", "runs:/x/model", "run:stage",
                                             "x", {}, "d")):
        with pytest.raises(Exception) as info:
            lookup()
        assert resilience.unavailable(info.value) == f"the MLflow server at http://127.0.0.1:{port}"


def test_configure_gives_mlflow_the_policy_but_an_operators_setting_wins(monkeypatch):
    saved = resilience.policy()
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    try:
        resilience.configure(attempts=6, backoff_s=2, max_backoff_s=30, timeout_s=90)
        import os

        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5"
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"  # the operator's
        resilience.configure(attempts=3, backoff_s=2, max_backoff_s=30, timeout_s=90)
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"  # ours, so a new config changes it
        cfg = resilience.boto_config()
        assert cfg.retries == {"total_max_attempts": 3, "mode": "standard"} and cfg.read_timeout == 90
    finally:
        resilience.configure(saved.attempts, saved.backoff_s, saved.max_backoff_s, saved.timeout_s)


def test_a_read_that_cannot_resume_fails_naming_s3(s3_endpoint, bucket, fast_retries):
    """Cut mid-file, then S3 stays unreachable: the resume's own tries run out and the error names S3."""
    uri = f"s3://{bucket}/dt=2026-07-02/part.jsonl"
    storage.write_bytes(uri, _lines(5_000), s3_endpoint)
    proxy = FaultyProxy(s3_endpoint)
    try:
        proxy.set("cut_matching", match=b"GET /resilience/dt%3D2026-07-02/", cut_after=4096, cuts=1, then="reset")
        with pytest.raises(Exception) as info:
            b"".join(storage.open_lines(uri, proxy.url))
    finally:
        proxy.close()
    assert proxy.broken == 1 + fast_retries.attempts  # the cut read, then every try to reconnect
    assert resilience.unavailable(info.value) == f"S3 at {proxy.url}"
