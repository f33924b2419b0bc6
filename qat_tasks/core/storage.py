"""Reading and writing date-partitioned logs and artifacts on a local folder or an s3:// prefix.

Layout of logged traffic:  <root>/dt=YYYY-MM-DD/<any name>.jsonl[.gz]
"""

from __future__ import annotations

import gzip
import io
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

_PARTITION = re.compile(r"(?:^|/)dt=(\d{4}-\d{2}-\d{2})/[^/]+\.jsonl(?:\.gz)?$")


def package_path(uri: str) -> Path:
    """pkg://package/relative/path: a file or folder shipped inside an installed Python package."""
    import importlib.util

    package, _, rel = uri.removeprefix("pkg://").partition("/")
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{uri}: Python package {package!r} is not installed "
                                f"(pip install -r requirements.txt -c constraints.txt)")
    return Path(next(iter(spec.submodule_search_locations))) / rel


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise ValueError(f"not an s3 URI: {uri!r}")
    return bucket, key


def s3_client(endpoint_url: str | None = None):
    """A boto3 S3 client with the retry policy of qat_tasks.core.resilience (standard mode: throttling, 5xx and
    connection errors are retried with exponential backoff)."""
    import boto3

    from qat_tasks.core import resilience

    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return boto3.client("s3", endpoint_url=endpoint_url, config=resilience.boto_config())


@dataclass(frozen=True)
class LogFile:
    uri: str
    day: date

    @property
    def is_labels(self) -> bool:
        """A file of review labels (`labels-*`), not of logged turns."""
        return self.uri.rsplit("/", 1)[-1].startswith("labels")


def list_log_files(root: str, start: date, end: date, endpoint_url: str | None = None) -> list[LogFile]:
    """Log files whose partition day is in [start, end), sorted by day then name (a stable read order)."""
    found: list[LogFile] = []
    if is_s3(root):
        bucket, prefix = split_s3(root.rstrip("/") + "/")
        client = s3_client(endpoint_url)
        # List one partition prefix per day: a quarter is ~92 cheap calls, not a scan of years of logs.
        day = start
        while day < end:
            paginator = client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=bucket, Prefix=f"{prefix}dt={day.isoformat()}/"):
                for obj in page.get("Contents", []):
                    if _PARTITION.search(obj["Key"]):
                        found.append(LogFile(f"s3://{bucket}/{obj['Key']}", day))
            day += timedelta(days=1)
    else:
        base = Path(root)
        if not base.is_dir():
            raise FileNotFoundError(f"traffic source folder does not exist: {root}")
        for part in base.glob("dt=*"):
            try:
                day = date.fromisoformat(part.name[3:])
            except ValueError:
                continue
            if start <= day < end:
                found.extend(LogFile(str(f), day) for f in part.iterdir() if _PARTITION.search(str(f)))
    return sorted(found, key=lambda f: (f.day, f.uri))


def open_lines(uri: str, endpoint_url: str | None = None) -> Iterator[bytes]:
    """Stream the lines of a plain or gzip JSONL file (local or s3) without loading it whole."""
    if is_s3(uri):
        from qat_tasks.core.resilience import ResumableBody

        bucket, key = split_s3(uri)
        body = ResumableBody(s3_client(endpoint_url), bucket, key)  # streamed; a broken read resumes in place
        try:
            reader = io.BufferedReader(body, buffer_size=1 << 20)
            yield from (_lines_of_gzip(reader) if uri.endswith(".gz") else reader)
        finally:
            body.close()
        return
    with open(uri, "rb", buffering=1 << 20) as fh:
        yield from (_lines_of_gzip(fh) if uri.endswith(".gz") else fh)


def _lines_of_gzip(fileobj) -> io.BufferedReader:
    """A gzip stream's lines, split in C by a buffered reader (GzipFile's own line iterator is Python code)."""
    return io.BufferedReader(gzip.GzipFile(fileobj=fileobj), buffer_size=1 << 20)


def write_bytes(uri: str, data: bytes, endpoint_url: str | None = None) -> None:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client(endpoint_url).put_object(Bucket=bucket, Key=key, Body=data)
    else:
        path = Path(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)  # atomic: a crash never leaves half a file under the final name


def read_bytes(uri: str, endpoint_url: str | None = None) -> bytes:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        return s3_client(endpoint_url).get_object(Bucket=bucket, Key=key)["Body"].read()
    return Path(uri).read_bytes()


def exists(uri: str, endpoint_url: str | None = None) -> bool:
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = split_s3(uri)
        try:
            s3_client(endpoint_url).head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
    return Path(uri).exists()


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts]) if is_s3(root) else str(Path(root, *parts))


def download_prefix(uri: str, dest: Path, endpoint_url: str | None = None) -> Path:
    """Copy every object under an s3:// prefix (or a local folder) into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    if not is_s3(uri):
        shutil.copytree(uri, dest, dirs_exist_ok=True)
        return dest
    bucket, prefix = split_s3(uri.rstrip("/") + "/")
    client = s3_client(endpoint_url)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            target = dest / obj["Key"][len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, obj["Key"], str(target))
    return dest


def gzip_bytes(text: str) -> bytes:
    # mtime=0: the same content always gives the same bytes, so content hashes are stable across retries.
    return gzip.compress(text.encode("utf-8"), compresslevel=6, mtime=0)
