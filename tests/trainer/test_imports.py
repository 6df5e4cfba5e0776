"""Import boundaries: the entry point's checks run before torch loads (bad input fails fast), and unsloth is
imported by its engine's module only (it patches transformers/trl at import)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

TRAINER = Path(__file__).resolve().parents[2] / "trainer"


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_entry_point_checks_load_no_torch():
    code = ("import sys\n"
            "import kubesloth.trainer.main, kubesloth.trainer.recipe, kubesloth.trainer.engines\n"
            "from kubesloth.trainer import config, profiles, sources, save, checkpoints, metrics, data\n"
            "bad = [m for m in ('torch', 'transformers', 'trl', 'unsloth', 'datasets') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def _is_unsloth(node: ast.AST) -> bool:
    if isinstance(node, ast.Import):
        return any(a.name == "unsloth" or a.name.startswith("unsloth.") for a in node.names)
    return isinstance(node, ast.ImportFrom) and bool(node.module) and node.module.split(".")[0] == "unsloth"


def test_unsloth_is_imported_only_inside_gpu_engine_functions():
    """Never at module level (importing a module must not patch transformers), never outside engines/."""
    offences = []
    for path in sorted(TRAINER.rglob("*.py")):
        tree = ast.parse(path.read_text())
        in_functions = {id(node) for func in ast.walk(tree)
                        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef))
                        for node in ast.walk(func)}
        for node in ast.walk(tree):
            if _is_unsloth(node):
                where = str(path.relative_to(TRAINER))
                if id(node) not in in_functions or not where.startswith("engines/"):
                    offences.append(f"{where}:{node.lineno}")
    assert not offences, offences
    assert any(_is_unsloth(n) for n in ast.walk(ast.parse((TRAINER / "engines" / "unsloth.py").read_text())))


def test_unsloth_environment_skips_trl_rewrites_only_for_an_engine_without_trl(monkeypatch):
    """The fused engine (its own loop) imports unsloth with UNSLOTH_ALLOW_CPU=1, which is what stops Unsloth
    rewriting TRL's trainers at import; the unsloth engine (TRL's SFTTrainer) needs them; a pod's own value wins."""
    import os

    from kubesloth.trainer.engines import loading

    for name in ("UNSLOTH_ALLOW_CPU", "UNSLOTH_DISABLE_CPU_FALLBACK"):
        monkeypatch.delenv(name, raising=False)
    loading.before_unsloth()
    assert "UNSLOTH_ALLOW_CPU" not in os.environ
    assert os.environ["UNSLOTH_DISABLE_CPU_FALLBACK"] == "1"
    loading.before_unsloth(uses_trl=False)
    assert os.environ["UNSLOTH_ALLOW_CPU"] == "1"
    monkeypatch.setenv("UNSLOTH_ALLOW_CPU", "0")
    loading.before_unsloth(uses_trl=False)
    assert os.environ["UNSLOTH_ALLOW_CPU"] == "0"

    # Who asks for what: the fused engine loads without TRL, the unsloth engine with it.
    def load_calls(path: Path) -> list:
        calls = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load_unsloth":
                calls.append({k.arg: ast.literal_eval(k.value) for k in node.keywords})
        return calls

    assert load_calls(TRAINER / "engines" / "fused.py") == [{"uses_trl": False}]
    assert load_calls(TRAINER / "engines" / "unsloth.py") == [{}]
