"""The `kubesloth` command: generate the CRD, run the operator, run the local control plane, node agent and demo."""

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
        from kubesloth.local.demo import Background

        Background(cluster.state_dir.parent).stop_all()  # an operator/node agent a `demo --keep` left running
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


def kopf_argv(extra: list[str], namespaces: tuple[str, ...] = ()) -> list[str]:
    """`kopf run` arguments for the operator; the defaults are added only where the user gave none.

    --standalone: one replica, no peering (the chart runs a single-replica Deployment with strategy Recreate, so two
    operators never act at once); pass --peering NAME (with crds/kopf-peering.yaml applied) to use kopf's peering.
    """
    argv = ["run", "--module", "kubesloth.operator.handlers", *extra]
    if not {"--standalone", "--peering", "--priority"} & {a.split("=")[0] for a in extra}:
        argv.append("--standalone")
    if not {"-n", "--namespace", "-A", "--all-namespaces"} & {a.split("=")[0] for a in extra}:
        argv += [arg for ns in namespaces for arg in ("--namespace", ns)] if namespaces else ["--all-namespaces"]
    return argv


def cmd_operator(args: argparse.Namespace) -> int:
    from kubesloth.operator.settings import OperatorSettings, SettingsError

    try:
        settings = OperatorSettings.from_env()
    except SettingsError as err:
        print(f"kubesloth operator: {err}", file=sys.stderr)
        return 2
    from kopf import cli as kopf_cli

    extra = [a for a in args.kopf_args if a != "--"]
    return kopf_cli.main(args=kopf_argv(extra, settings.namespaces), prog_name="kubesloth operator",
                         standalone_mode=False) or 0


def cmd_nodeagent(args: argparse.Namespace) -> int:
    from kubesloth.local.nodeagent import run_from_args

    return run_from_args(args)


def cmd_plan(args: argparse.Namespace) -> int:
    """The memory plan of a FineTuneJob file and its price on every GPU class."""
    import yaml
    from pydantic import ValidationError

    from kubesloth.api.v1alpha1 import FineTuneJob
    from kubesloth.planner import ModelShape, ShapeError
    from kubesloth.plan_report import report

    try:
        job = FineTuneJob.model_validate(yaml.safe_load(Path(args.file).read_text()))
    except (OSError, yaml.YAMLError, ValidationError) as err:
        print(f"kubesloth plan: {args.file}: {err}", file=sys.stderr)
        return 2
    try:
        if args.model_config:
            shape = ModelShape.from_file(Path(args.model_config))
            note = f"{shape.model_type}, {shape.parameters / 1e9:.2f}B parameters ({args.model_config})"
        else:
            from kubesloth.operator.estimate import resolve_shape
            from kubesloth.operator.settings import OperatorSettings

            shape, note = resolve_shape(job.spec, OperatorSettings(hub_configs=not args.offline))
    except ShapeError as err:
        print(f"kubesloth plan: spec.model.source: {err}", file=sys.stderr)
        return 2
    if shape is None:
        print(f"kubesloth plan: {note} (or pass --model-config PATH/config.json)", file=sys.stderr)
        return 2
    print(report(job.spec, shape, note))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubesloth", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    crd = sub.add_parser("crd", help="print (or --write) the CRD generated from the API types")
    crd.add_argument("--write", action="store_true")
    crd.set_defaults(func=cmd_crd)

    operator = sub.add_parser("operator", help="run the operator (kopf); other arguments go to `kopf run`",
                              description="Run the kubesloth operator. Settings: KUBESLOTH_OPERATOR_* env vars "
                                          "(docs/operator.md); other arguments are passed to `kopf run`.")
    operator.add_argument("kopf_args", nargs="*", help="kopf run options, e.g. --verbose (after --)")
    operator.set_defaults(func=cmd_operator)

    plan = sub.add_parser("plan", help="the memory plan of a FineTuneJob and its price on every GPU class")
    plan.add_argument("file", help="a FineTuneJob YAML")
    plan.add_argument("--model-config", help="the model's config.json (default: spec.model.architecture, the "
                                             "hub's config.json for hf://, or a known hub name)")
    plan.add_argument("--offline", action="store_true", help="do not ask the hub for config.json")
    plan.set_defaults(func=cmd_plan)

    dev = sub.add_parser("dev", help="the local control plane, node agent and demo")
    dev_sub = dev.add_subparsers(dest="dev_command", required=True)
    cluster = dev_sub.add_parser("cluster", help="start/stop a real local kube-apiserver + etcd + controllers")
    cluster.add_argument("action", choices=["up", "down", "env", "status"])
    cluster.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR))
    cluster.set_defaults(func=cmd_cluster)

    from kubesloth.local.nodeagent import add_arguments as nodeagent_arguments

    nodeagent = dev_sub.add_parser("nodeagent", help="play the kubelet for this machine: bind pods, run them locally")
    nodeagent_arguments(nodeagent)
    nodeagent.set_defaults(func=cmd_nodeagent)

    demo = dev_sub.add_parser("demo", help="run a FineTuneJob end to end on the local control plane")
    demo.add_argument("--example", default="examples/finetunejob-tiny.yaml")
    demo.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR))
    demo.add_argument("--timeout", type=float, default=600.0)
    demo.add_argument("--keep", action="store_true", help="leave the control plane running afterwards")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["operator"] and not {"-h", "--help"} & set(argv[1:]):
        # Everything after `operator` goes to `kopf run` verbatim (argparse would reorder options and values).
        args = argparse.Namespace(func=cmd_operator, kopf_args=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except subprocess.CalledProcessError as err:
        print(f"kubesloth: command failed ({err.returncode}): {shlex.join(map(str, err.cmd))}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
