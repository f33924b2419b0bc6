"""Typed pipeline configuration: `configs/*.yaml` -> pydantic models that reject unknown keys and wrong types
(the sections are `config_sections`).

Relative paths in a config file resolve against the project root (the folder that holds `configs/`; set
QAT_PROJECT_ROOT when the package is installed elsewhere), so the same file works from the CLI, from
Airflow workers and from tests, whatever their working directory.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError, field_validator, model_validator

from qat_tasks.core.config_operations import (
    BudgetConfig,
    DriftConfig,
    EvaluationConfig,
    GatesConfig,
    MemoryBudgetConfig,
    NotificationsConfig,
    RetriesConfig,
    SchedulingConfig,
    ServingConfig,
    ShadowConfig,
)
from qat_tasks.core.config_sections import (
    CalibrationConfig,
    ModelConfig,
    Strict,
    TrackingConfig,
    TrafficConfig,
)

# The folder that holds configs/ (qat_tasks/core/config.py -> three levels up), unless set.
PROJECT_ROOT = Path(os.environ.get("QAT_PROJECT_ROOT") or Path(__file__).resolve().parents[2])
DEFAULT_CONFIG = PROJECT_ROOT / "configs" / "demo.yaml"

class ConfigError(ValueError):
    """A configuration file that does not fit the schema; the message names the file and the key."""


class PipelineConfig(Strict):
    profile: str
    state_dir: str = ".state"
    tracking: TrackingConfig = TrackingConfig()
    traffic: TrafficConfig
    calibration: CalibrationConfig
    models: tuple[ModelConfig, ...]
    evaluation: EvaluationConfig = EvaluationConfig()
    gates: GatesConfig = GatesConfig()
    scheduling: SchedulingConfig = SchedulingConfig()
    retries: RetriesConfig = RetriesConfig()
    memory_budget: MemoryBudgetConfig = MemoryBudgetConfig()
    budget: BudgetConfig = BudgetConfig()
    serving: ServingConfig = ServingConfig()
    shadow: ShadowConfig = ShadowConfig()
    drift: DriftConfig = DriftConfig()
    notifications: NotificationsConfig = NotificationsConfig()

    @field_validator("models")
    @classmethod
    def _unique_names(cls, v: tuple[ModelConfig, ...]) -> tuple[ModelConfig, ...]:
        names = [m.name for m in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate model names {dupes}")
        if not v:
            raise ValueError("at least one model is required")
        return v

    @model_validator(mode="after")
    def _drift_models_known(self) -> PipelineConfig:
        known = {m.name: m.role for m in self.models}
        for name in self.drift.models or ():
            if name not in known:
                hint = difflib.get_close_matches(name, known, n=1)
                raise ValueError(f"drift.models: unknown model {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else
                                                                           f"; known: {sorted(known)}"))
            if known[name] not in ("intent_classifier", "escalation_detector"):
                raise ValueError(f"drift.models: {name} is a {known[name]}; the monitor reads the user's text, which "
                                 f"intent classifiers and escalation detectors take")
        return self

    @property
    def drift_models(self) -> list[str]:
        if self.drift.models is not None:
            return list(self.drift.models)
        return [m.name for m in self.models if m.role in ("intent_classifier", "escalation_detector")]

    @property
    def serving_log_dir(self) -> str:
        """Where the service logs: serving.log_dir (`state://sub` is under the state folder), else traffic.source."""
        if not self.serving.log_dir:
            return self.traffic_source
        if self.serving.log_dir.startswith("state://"):
            return str(self.state_path / self.serving.log_dir.removeprefix("state://"))
        return self.resolve(self.serving.log_dir)

    # -- resolved locations -------------------------------------------------------------------------
    def resolve(self, path_or_uri: str) -> str:
        if "://" in path_or_uri:
            return path_or_uri
        p = Path(os.path.expandvars(os.path.expanduser(path_or_uri)))
        return str(p if p.is_absolute() else PROJECT_ROOT / p)

    @property
    def state_path(self) -> Path:
        override = os.environ.get("QAT_STATE_DIR")
        return Path(override) if override else Path(self.resolve(self.state_dir))

    @property
    def tracking_uri(self) -> str:
        if self.tracking.uri:
            return self.tracking.uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        return f"sqlite:///{self.state_path / 'mlflow' / 'mlflow.db'}"

    @property
    def calibration_store(self) -> str:
        return self.resolve(self.calibration.output) if self.calibration.output else str(self.state_path / "calibration")

    @property
    def traffic_source(self) -> str:
        return self.resolve(self.traffic.source)

    @property
    def traffic_roots(self) -> list[str]:
        """Where the refresh reads logged traffic and review labels: traffic.source, and the service's own log
        folder when it logs elsewhere (the embedded default logs under the state folder)."""
        return [self.traffic_source] + ([self.serving_log_dir] if self.serving_log_dir != self.traffic_source else [])

    def model(self, name: str) -> ModelConfig:
        for m in self.models:
            if m.name == name:
                return m
        raise ConfigError(f"no model named {name!r} in profile {self.profile!r}; known: {[m.name for m in self.models]}")


def _describe(err: dict, data: object) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "extra_forbidden":
        parent = data
        for part in err["loc"][:-1]:
            parent = parent[part] if isinstance(parent, dict | list) else None
        allowed = []
        # Suggest the nearest allowed key: a typo should cost seconds, not a debugging session.
        model = _model_at(PipelineConfig, err["loc"][:-1], data)
        if model is not None:
            allowed = list(model.model_fields)
        hint = difflib.get_close_matches(str(err["loc"][-1]), allowed, n=1)
        suffix = f" (did you mean {hint[0]!r}?)" if hint else (f" (allowed: {', '.join(allowed)})" if allowed else "")
        return f"{loc}: unknown key{suffix}"
    if err["type"] == "missing":
        return f"{loc}: missing (required)"
    return f"{loc}: {err['msg']} (got {err.get('input')!r})"


def _model_at(model: type[BaseModel], loc: tuple, data: object) -> type[BaseModel] | None:
    """Walk the schema along an error location to find the model whose keys were wrong."""
    import typing

    current: object = model
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)) or part not in current.model_fields:
            return None
        ann = current.model_fields[part].annotation
        candidates = [ann, *typing.get_args(ann)]
        for arg in list(candidates):
            candidates.extend(typing.get_args(arg))
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def parse_config(data: object, source: str = "<config>") -> PipelineConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        # YAML dates and lists arrive as Python objects; strict mode still refuses "12" for an int.
        return PipelineConfig.model_validate(_tuples(data))
    except ValidationError as exc:
        problems = "\n  ".join(_describe(e, data) for e in exc.errors())
        raise ConfigError(f"{source}: {len(exc.errors())} problem(s):\n  {problems}") from None


def _tuples(obj: object) -> object:
    if isinstance(obj, dict):
        return {k: _tuples(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return tuple(_tuples(v) for v in obj)
    return obj


def load_config(path: str | Path | None = None) -> PipelineConfig:
    """Load the pipeline config: explicit path, else $QAT_CONFIG, else configs/demo.yaml."""
    path = Path(path or os.environ.get("QAT_CONFIG") or DEFAULT_CONFIG)
    if not path.is_absolute() and not path.exists():
        path = PROJECT_ROOT / path
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(data, str(path))
