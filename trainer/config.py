"""The run's configuration: the mounted FineTuneJob YAML, validated with the same types as the CRD."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import ValidationError

from kubesloth.api.contract import CONFIG_PATH, Env
from kubesloth.api.v1alpha1 import FineTuneJob
from kubesloth.trainer.errors import BadConfig


def config_path(cli_path: str | None = None) -> Path:
    """--config wins (humans), then $KUBESLOTH_CONFIG (the pod), then the contract's mount path."""
    return Path(cli_path or os.environ.get(Env.CONFIG.value) or CONFIG_PATH)


def _field_path(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)


def load_job(path: Path) -> FineTuneJob:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise BadConfig(f"config file {path} does not exist (set {Env.CONFIG.value} or --config)") from None
    except OSError as exc:
        raise BadConfig(f"config file {path} cannot be read: {exc.strerror}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise BadConfig(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(doc, dict) or "spec" not in doc:
        raise BadConfig(f"config file {path} must be a FineTuneJob (a mapping with apiVersion, kind, spec)")
    try:
        return FineTuneJob.model_validate(doc)
    except ValidationError as exc:
        problems = []
        for err in exc.errors()[:5]:
            problems.append(f"{_field_path(err['loc'])}: {err['msg']}")
        more = f" (+{exc.error_count() - 5} more)" if exc.error_count() > 5 else ""
        raise BadConfig(f"invalid FineTuneJob in {path}: " + "; ".join(problems) + more) from None
