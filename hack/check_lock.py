#!/usr/bin/env python3
"""Compares the Python packages installed where it runs with requirements/trainer.lock (standard library only: it
runs inside the trainer image, on the H200 and here).

    python3 hack/check_lock.py                      # exact: installed == lock (the image; kubesloth itself aside)
    python3 hack/check_lock.py --require unsloth,trl --known-differ torch,triton --json versions.json
        # only the named packages must equal the lock; --known-differ ones are printed and recorded, not failed;
        # every other lock package is reported (the H200 benchmark: its image brings torch, triton, ...)

Exit 0 when the check holds, 1 when it does not (each difference on stderr).
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import re
import sys
from pathlib import Path

LOCK = Path(__file__).resolve().parent.parent / "requirements" / "trainer.lock"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")
# Not part of the package set: the project itself, and the installer (absent from the image).
NEVER_LOCKED = {"kubesloth", "pip"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        match = PIN.match(line.strip())
        if match:
            pins[canonical(match.group(1))] = match.group(2)
    return pins


def installed() -> dict[str, str]:
    """name -> version of every distribution on sys.path (first one wins, as imports do): pip freeze's view."""
    found: dict[str, str] = {}
    for dist in md.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(canonical(name), dist.version)
    return found


def local_base(version: str) -> str:
    """2.11.0+cu130 -> 2.11.0; 2026.10.9 stays (a wheel's build tag never reaches the version)."""
    return version.split("+", 1)[0]


def compare(lock: dict[str, str], have: dict[str, str], require: set[str] | None = None,
            known_differ: set[str] = frozenset()) -> dict:
    """require None: exact (same names, same versions). Otherwise only `require` must match; the rest is reported."""
    have = {name: version for name, version in have.items() if name not in NEVER_LOCKED}
    report: dict = {"matched": {}, "differ": {}, "missing": [], "extra": {}, "known_differ": {}, "problems": []}
    for name, version in sorted(lock.items()):
        got = have.get(name)
        if got is None:
            report["missing"].append(name)
        elif name in known_differ:
            report["known_differ"][name] = {"lock": version, "installed": got}
        elif got == version:
            report["matched"][name] = version
        else:
            report["differ"][name] = {"lock": version, "installed": got}
    report["extra"] = {name: version for name, version in sorted(have.items()) if name not in lock}
    if require is None:
        report["problems"] += [f"{name}: lock {d['lock']}, installed {d['installed']}"
                               for name, d in report["differ"].items()]
        report["problems"] += [f"{name}: in the lock, not installed" for name in report["missing"]]
        report["problems"] += [f"{name}=={v}: installed, not in the lock" for name, v in report["extra"].items()]
        report["problems"] += [f"{name}: lock {d['lock']}, installed {d['installed']} (known difference)"
                               for name, d in report["known_differ"].items()]
    else:
        unknown = require - lock.keys()
        report["problems"] += [f"{name}: required but not in the lock" for name in sorted(unknown)]
        for name in sorted(require & lock.keys()):
            if name in report["differ"]:
                d = report["differ"][name]
                report["problems"].append(f"{name}: lock {d['lock']}, installed {d['installed']}")
            elif name in report["missing"]:
                report["problems"].append(f"{name}: in the lock, not installed")
    report["ok"] = not report["problems"]
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lock", type=Path, default=LOCK)
    parser.add_argument("--require", help="comma-separated: only these must equal the lock (default: everything)")
    parser.add_argument("--known-differ", default="", help="comma-separated: print and record, never fail")
    parser.add_argument("--json", type=Path, help="write the full report here")
    args = parser.parse_args(argv)
    split = lambda text: {canonical(n) for n in text.split(",") if n.strip()}  # noqa: E731
    report = compare(read_lock(args.lock), installed(), split(args.require) if args.require else None,
                     split(args.known_differ))
    report["python"] = sys.version.split()[0]
    report["lock"] = str(args.lock)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    for name, d in report["known_differ"].items():
        print(f"[check-lock] {name}: lock {d['lock']}, here {d['installed']} (known difference)")
    print(f"[check-lock] {len(report['matched'])} packages as locked, {len(report['differ'])} other versions, "
          f"{len(report['missing'])} missing, {len(report['extra'])} not in the lock")
    for problem in report["problems"]:
        print(f"[check-lock] MISMATCH {problem}", file=sys.stderr)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
