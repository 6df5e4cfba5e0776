"""Layers, enforced on the source: every import statement of each layer is read (ast) and checked against what
the layer may import (docs/architecture.md). A static check cannot be fooled by what happens to be installed."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FORBIDDEN = {
    "api": {"kubesloth.operator", "kubesloth.trainer", "kubesloth.local", "kopf", "kubernetes", "torch",
            "transformers", "trl", "datasets", "unsloth", "prometheus_client"},
    "operator": {"kubesloth.trainer", "torch", "transformers", "trl", "datasets", "unsloth", "accelerate"},
    "trainer": {"kubesloth.operator", "kubesloth.local", "kopf", "kubernetes"},
    "kubesloth": {"torch", "transformers", "trl", "datasets", "unsloth", "kubesloth.trainer"},
    # The memory planner is pure arithmetic shared by the operator, the trainer and the CLI.
    "planner": {"kubesloth.operator", "kubesloth.trainer", "kubesloth.local", "kopf", "kubernetes", "torch",
                "transformers", "trl", "datasets", "unsloth", "prometheus_client", "huggingface_hub"},
}
# The API may import nothing but the standard library, pydantic and itself (yaml only in the CRD generator).
API_ALLOWED_THIRD_PARTY = {"pydantic", "yaml"}


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _matches(name: str, banned: str) -> bool:
    return name == banned or name.startswith(banned + ".")


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_nothing_forbidden(layer):
    offences = []
    for path in sorted((ROOT / layer).rglob("*.py")):
        for name in imports_of(path):
            if any(_matches(name, banned) for banned in FORBIDDEN[layer]):
                offences.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offences, "\n".join(offences)


def test_api_imports_only_stdlib_and_pydantic():
    for path in sorted((ROOT / "api").rglob("*.py")):
        for name in imports_of(path):
            top = name.split(".")[0]
            assert (top in sys.stdlib_module_names or top in API_ALLOWED_THIRD_PARTY
                    or name.startswith("kubesloth.api")), f"{path.name} imports {name}"


def test_planner_imports_only_stdlib_and_the_api():
    for path in sorted((ROOT / "planner").rglob("*.py")):
        for name in imports_of(path):
            top = name.split(".")[0]
            assert top in sys.stdlib_module_names or name.startswith(("kubesloth.api", "kubesloth.planner")), \
                f"{path.name} imports {name}"


def test_checker_sees_a_forbidden_import(tmp_path):
    bad = tmp_path / "handler.py"
    bad.write_text("import os\nfrom torch import nn\n")
    assert "torch" in imports_of(bad)


def test_operator_import_loads_no_torch():
    code = ("import sys, kubesloth.api, kubesloth.operator; "
            "bad = [m for m in ('torch', 'transformers', 'unsloth', 'trl') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
