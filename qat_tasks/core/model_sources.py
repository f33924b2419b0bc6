"""Where model weights come from (configs' `source`), for the encoders and the LLM alike:

  /abs/or/relative/path      a saved Hugging Face model folder
  s3://bucket/prefix         the same folder on S3 (downloaded once into <state>/cache/models)
  hf://org/name or org/name  a Hugging Face hub id (needs network; offline it fails with a clear message)
  pkg://package/subdir       a model folder shipped inside an installed Python package (offline default)
  state://subdir             a folder under the pipeline's state directory
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from qat_tasks.core import storage
from qat_tasks.core.config import PipelineConfig

log = logging.getLogger(__name__)


def resolve_source(cfg: PipelineConfig, source: str) -> Path:
    """A local folder holding the model named by `source`."""
    if source.startswith("pkg://"):
        path = storage.package_path(source)
    elif source.startswith("state://"):
        path = cfg.state_path / source.removeprefix("state://")
    elif storage.is_s3(source):
        digest = hashlib.sha256(source.encode()).hexdigest()[:16]
        path = cfg.state_path / "cache" / "models" / digest
        if not (path / "config.json").exists():
            log.info("downloading model %s -> %s", source, path)
            storage.download_prefix(source, path, cfg.traffic.s3_endpoint_url)
    elif source.startswith("hf://") or ("/" in source and not Path(cfg.resolve(source)).exists()):
        hub_id = source.removeprefix("hf://")
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(hub_id, cache_dir=str(cfg.state_path / "cache" / "hub")))
        except Exception as exc:
            raise FileNotFoundError(f"model source {source}: could not fetch {hub_id!r} from the Hugging Face hub "
                                    f"({type(exc).__name__}: {exc}). Offline, use a local path, s3:// or pkg:// source."
                                    ) from exc
    else:
        path = Path(cfg.resolve(source))
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"model source {source}: {path} holds no config.json (not a saved model folder)")
    return path
