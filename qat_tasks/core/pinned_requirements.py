"""Exact pip requirements for a registered model's own environment (`mlflow models serve` builds it from them).

Versions come from the project's constraints.txt, the freeze every pipeline environment is installed with, so a
served model runs on the ONNX Runtime, tokenizers and transformers its gates were measured on. An installation
without the source tree (a wheel, no constraints.txt beside the package) pins what this environment runs, which
was installed from that same file. Local version labels are dropped (`torch==2.13.0+cpu` -> `torch==2.13.0`): a
label names a build on another index, and the public release is the same code.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

CONSTRAINTS = Path(__file__).resolve().parents[2] / "constraints.txt"

_PIN = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*==\s*([^\s;#]+)")


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): lower case, runs of -_. as one dash."""
    return re.sub(r"[-_.]+", "-", name).lower()


def public_version(version: str) -> str:
    return version.split("+", 1)[0]


def constraint_pins(path: Path = CONSTRAINTS) -> dict[str, str]:
    """{canonical name: public version} of every `name==version` line of a constraints file."""
    pins = {}
    for line in path.read_text().splitlines():
        if m := _PIN.match(line):
            pins[canonical(m.group(1))] = public_version(m.group(2))
    return pins


def pinned(*names: str, constraints: Path | None = None) -> list[str]:
    """`name==version` for each distribution, versions from constraints.txt (or, where the package is installed
    without it, from this environment). A name pinned nowhere raises: an unpinned requirement would let the
    served environment pick another release than the one measured."""
    path = constraints or CONSTRAINTS
    pins = constraint_pins(path) if path.is_file() else None
    out = []
    for name in names:
        if pins is not None:
            version = pins.get(canonical(name))
            if version is None:
                raise KeyError(f"{name} is not pinned in {path}")
        else:
            try:
                version = public_version(metadata.version(name))
            except metadata.PackageNotFoundError as exc:
                raise KeyError(f"{name}: no {path} to pin it from and not installed here") from exc
        out.append(f"{name}=={version}")
    return out
