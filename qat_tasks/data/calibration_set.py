"""A calibration version as the refresh writes it: a folder (or s3:// prefix) named `<window>-<content hash>` with
one gzipped JSONL file per split, the LLM conversations, the quarantined lines and a manifest written last (its
presence means the version is complete). Readers check every split against the sha256 in the manifest."""

from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass

from qat_tasks.core import storage

MANIFEST_SCHEMA = "mangaassist.calibration/2"  # 2: a selection split beside evaluation


class RefreshError(RuntimeError):
    """The window cannot give trustworthy calibration data; the message says why and what to look at."""


class EmptyWindowError(RefreshError):
    pass


class InvalidTrafficError(RefreshError):
    pass


class IntentCoverageError(RefreshError):
    pass


@dataclass(frozen=True)
class RefreshResult:
    version: str
    uri: str  # folder or s3:// prefix holding the version's files
    manifest: dict

    def split_uri(self, split: str) -> str:
        return storage.join(self.uri, f"{split}.jsonl.gz")


def load_manifest(uri: str, endpoint_url: str | None = None) -> dict:
    return json.loads(storage.read_bytes(storage.join(uri, "manifest.json"), endpoint_url))


def load_split(uri: str, split: str, endpoint_url: str | None = None) -> list[dict]:
    """Rows of one split of a calibration version; checks the content hash against the manifest."""
    manifest = load_manifest(uri, endpoint_url)
    meta = manifest["llm_conversations"] if split == "llm_conversations" else manifest["splits"][split]
    body = gzip.decompress(storage.read_bytes(storage.join(uri, meta["file"]), endpoint_url))
    if hashlib.sha256(body).hexdigest() != meta["sha256"]:
        raise RefreshError(f"{uri}/{meta['file']} does not match the sha256 in its manifest: the version was modified")
    return [json.loads(line) for line in body.decode("utf-8").splitlines()]
