"""The `kubesloth` command: generate the CRD, run the local control plane, run the demo."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

DEFAULT_STATE_DIR = Path(".kubesloth") / "cluster"


def _cluster(args: argparse.Namespace):
    from kubesloth.local.cluster import LocalCluster

    return LocalCluster(Path(args.state_dir))


def cmd_crd(args: argparse.Namespace) -> int:
    from kubesloth.api import crd

    return crd.main(["--write"] if args.write else [])


def cmd_cluster(args: argparse.Namespace) -> int:
    cluster = _cluster(args)
    if args.action == "up":
        cluster.up()
        print(f"control plane up: {cluster.info()['server']}")
        print(f"export KUBECONFIG={cluster.kubeconfig}")
    elif args.action == "down":
        cluster.down()
        print("control plane stopped")
    elif args.action == "env":
        print(f"export KUBECONFIG={shlex.quote(str(cluster.kubeconfig))}")
    elif args.action == "status":
        up = cluster.is_up()
        print("up" if up else "down")
        return 0 if up else 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from kubesloth.local.demo import run_demo

    return run_demo(Path(args.state_dir), Path(args.example), timeout=args.timeout, keep=args.keep)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubesloth", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    crd = sub.add_parser("crd", help="print (or --write) the CRD generated from the API types")
    crd.add_argument("--write", action="store_true")
    crd.set_defaults(func=cmd_crd)

    dev = sub.add_parser("dev", help="the local control plane and demo")
    dev_sub = dev.add_subparsers(dest="dev_command", required=True)
    cluster = dev_sub.add_parser("cluster", help="start/stop a real local kube-apiserver + etcd + controllers")
    cluster.add_argument("action", choices=["up", "down", "env", "status"])
    cluster.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR))
    cluster.set_defaults(func=cmd_cluster)

    demo = dev_sub.add_parser("demo", help="run a FineTuneJob end to end on the local control plane")
    demo.add_argument("--example", default="examples/finetunejob-tiny.yaml")
    demo.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR))
    demo.add_argument("--timeout", type=float, default=600.0)
    demo.add_argument("--keep", action="store_true", help="leave the control plane running afterwards")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except subprocess.CalledProcessError as err:
        print(f"kubesloth: command failed ({err.returncode}): {shlex.join(map(str, err.cmd))}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
