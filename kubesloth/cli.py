"""The `kubesloth` command (also `kubectl sloth`): submit, follow, wait on and read FineTuneJobs (docs/cli.md);
generate the CRD, run the operator, the memory planner, the local control plane, node agent and demo."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, TextIO

from kubesloth import __version__

DEFAULT_STATE_DIR = Path(".kubesloth") / "cluster"
LOG_FORMAT_ENV = "KUBESLOTH_LOG_FORMAT"  # json: the operator (kopf --log-format=json) and the trainer log JSON


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


def kopf_argv(extra: list[str], namespaces: tuple[str, ...] = (), log_format: str | None = None) -> list[str]:
    """`kopf run` arguments for the operator; the defaults are added only where the user gave none.

    --standalone: one replica, no peering (the chart runs a single-replica Deployment with strategy Recreate, so two
    operators never act at once); pass --peering NAME (with crds/kopf-peering.yaml applied) to use kopf's peering.
    `log_format` (KUBESLOTH_LOG_FORMAT): kopf's --log-format (plain, full or json: one JSON object a line).
    """
    argv = ["run", "--module", "kubesloth.operator.handlers", *extra]
    given = {a.split("=")[0] for a in extra}
    if not {"--standalone", "--peering", "--priority"} & given:
        argv.append("--standalone")
    if not {"-n", "--namespace", "-A", "--all-namespaces"} & given:
        argv += [arg for ns in namespaces for arg in ("--namespace", ns)] if namespaces else ["--all-namespaces"]
    if log_format and "--log-format" not in given:
        argv.append(f"--log-format={log_format}")
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
    log_format = os.environ.get(LOG_FORMAT_ENV) or None
    if log_format and log_format not in ("plain", "full", "json"):
        print(f"kubesloth operator: {LOG_FORMAT_ENV}={log_format}: expected plain, full or json", file=sys.stderr)
        return 2
    return kopf_cli.main(args=kopf_argv(extra, settings.namespaces, log_format), prog_name="kubesloth operator",
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



# --- the user's commands: submit, status, logs, wait, get (kubesloth.client does the work) -------------------------
def _conn(args: argparse.Namespace):
    from kubesloth.client import Connection

    return Connection(args.kubeconfig, args.context, args.namespace)


def _stamp() -> str:
    return datetime.now().strftime("%H:%M:%S")


class ProgressPrinter:
    """A follower's output: on a terminal one line updated in place (the phase's changes on lines of their own);
    otherwise plain lines with a time stamp, a progress line at most every `plain_every` seconds."""

    def __init__(self, stream: TextIO, tty: bool | None = None, plain_every: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, stamp: Callable[[], str] = _stamp):
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.plain_every = plain_every
        self.clock, self.stamp = clock, stamp
        self.last_event: str | None = None
        self.last_line: str | None = None
        self.last_plain = float("-inf")
        self.dirty = False

    def _width(self) -> int:
        return max(shutil.get_terminal_size((100, 24)).columns - 1, 20)

    def update(self, ftj: dict[str, Any]) -> None:
        from kubesloth.client import event_line, outcome, progress_line

        event = event_line(ftj)
        if event != self.last_event:
            self.last_event = event
            prefix = "\r\x1b[K" if self.tty and self.dirty else ""
            self.stream.write(f"{prefix}{self.stamp()} {event}\n")
            self.dirty = False
        status = ftj.get("status") or {}
        if status.get("progress"):
            line = progress_line(ftj, bar_width=20 if self.tty else 0)
            if self.tty:
                self.stream.write("\r\x1b[K" + line[:self._width()])
                self.dirty = True
            elif line != self.last_line and (self.clock() - self.last_plain >= self.plain_every
                                             or outcome(ftj).done):
                self.stream.write(f"{self.stamp()} {line}\n")
                self.last_line, self.last_plain = line, self.clock()
        self.stream.flush()

    def close(self) -> None:
        if self.dirty:
            self.stream.write("\n")
            self.dirty = False
        self.stream.flush()


def summary(ftj: dict[str, Any]) -> str:
    """The last words of `submit`/`wait` on a Succeeded run."""
    from kubesloth.client import human_duration, result_of

    result = result_of(ftj)
    bits = [f"{result.steps} steps" if result.steps is not None else None,
            f"final loss {result.loss:.4f}" if isinstance(result.loss, (int, float)) else None]
    took = f" in {human_duration(result.duration_seconds)}" if result.duration_seconds is not None else ""
    line = f"{result.name} Succeeded{took}" + (f": {', '.join(b for b in bits if b)}" if any(bits) else "")
    if result.path:
        size = ", ".join(x for x in (f"{result.files} files" if result.files is not None else None,
                                     f"{result.bytes / 2**20:.1f} MiB" if result.bytes is not None else None) if x)
        line += f"\nmodel: {result.path}" + (f" ({size})" if size else "")
    return line


def finish(ftj: dict[str, Any], prog: str, wanted: str | None = None) -> int:
    """Print the outcome; its exit code (docs/cli.md)."""
    from kubesloth.client import Exit, outcome

    found = outcome(ftj)
    phase = (ftj.get("status") or {}).get("phase")
    name = ftj["metadata"]["name"]
    if wanted and phase == wanted:
        print(summary(ftj) if phase == "Succeeded" else f"{name} is {phase}")
        return Exit.SUCCEEDED
    if found.code == Exit.SUCCEEDED and not wanted or (wanted == "Succeeded" and found.code == Exit.SUCCEEDED):
        print(summary(ftj))
        return Exit.SUCCEEDED
    if found.code == Exit.SUCCEEDED:  # finished, but not in the phase waited for
        print(f"{prog}: {name} finished Succeeded without being seen {wanted}", file=sys.stderr)
        return Exit.FAILED
    print(f"{prog}: {name} {found.describe()}", file=sys.stderr)
    if found.code == Exit.REFUSED:
        print(f"{prog}: nothing runs until the spec changes (kubesloth status {name}; docs/operator.md, Refusals)",
              file=sys.stderr)
    elif found.code == Exit.FAILED:
        print(f"{prog}: the trainer's log: kubesloth logs {name}", file=sys.stderr)
    return found.code


def cmd_submit(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from kubesloth.client import ClientError, Exit, FineTuneJob, follow, outcome

    try:
        job = FineTuneJob.from_yaml(args.file)
    except ValidationError as err:
        print(f"{args.prog}: {args.file}: not a valid FineTuneJob:\n{err}", file=sys.stderr)
        return Exit.USAGE
    except ClientError as err:
        print(f"{args.prog}: {err}", file=sys.stderr)
        return err.code
    file_ns = job.body["metadata"].get("namespace")
    if file_ns and args.namespace and file_ns != args.namespace:
        print(f"{args.prog}: the namespace in {args.file} ({file_ns}) does not match --namespace {args.namespace}",
              file=sys.stderr)
        return Exit.USAGE
    conn = _conn(args)
    job._conn = conn
    before = conn.get(job.name, job.namespace)
    if before is not None and args.replace:
        print(f"deleting finetunejob {job.namespace}/{job.name} first (--replace)", flush=True)
    job.submit(replace=args.replace and before is not None)
    after = job.last or {}
    if before is None or args.replace:
        verb = "created"
    else:
        verb = ("configured" if (after.get("metadata") or {}).get("generation")
                != (before.get("metadata") or {}).get("generation") else "unchanged")
    print(f"finetunejob.{after.get('apiVersion', 'kubesloth.io').split('/')[0]}/{job.name} {verb}", flush=True)
    if before is not None and not args.replace and outcome(before).done:
        change = "" if verb == "unchanged" else "; a changed spec does not run it again (SpecLocked)"
        print(f"(it had already finished {(before.get('status') or {}).get('phase')}{change}; --replace runs it "
              f"again)", flush=True)
    if args.detach:
        return Exit.SUCCEEDED
    printer = ProgressPrinter(sys.stdout, plain_every=args.plain_every)
    try:
        ftj = follow(conn, job.name, job.namespace, args.timeout, args.interval, on_update=printer.update)
    finally:
        printer.close()
    return finish(ftj, args.prog)


def cmd_wait(args: argparse.Namespace) -> int:
    from kubesloth.client import follow, outcome

    conn = _conn(args)
    conn.must_get(args.name)
    printer = ProgressPrinter(sys.stdout, plain_every=args.plain_every) if args.progress else None

    def reached(ftj: dict[str, Any]) -> bool:
        return (ftj.get("status") or {}).get("phase") == args.for_phase or outcome(ftj).done

    try:
        ftj = follow(conn, args.name, None, args.timeout, args.interval, reached,
                     printer.update if printer else None)
    finally:
        if printer:
            printer.close()
    return finish(ftj, args.prog, args.for_phase)


def _dump(obj: Any, output: str) -> str:
    if output == "json":
        return json.dumps(obj, indent=2)
    import yaml

    return yaml.safe_dump(obj, sort_keys=False, width=120).rstrip()


def cmd_status(args: argparse.Namespace) -> int:
    from kubesloth.client import describe

    ftj = _conn(args).must_get(args.name)
    print(_dump(ftj.get("status") or {}, args.output) if args.output else describe(ftj))
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    from kubesloth.client import table

    conn = _conn(args)
    if args.names:
        items = [conn.must_get(name) for name in args.names]
    else:
        items = conn.list(all_namespaces=args.all_namespaces)
    if args.output in ("json", "yaml"):
        obj = items[0] if len(args.names) == 1 else {"apiVersion": "v1", "kind": "List", "items": items}
        print(_dump(obj, args.output))
    elif args.output == "name":
        print("\n".join(f"finetunejob.kubesloth.io/{i['metadata']['name']}" for i in items))
    elif not items:
        where = "any namespace" if args.all_namespaces else f"namespace {conn.namespace}"
        print(f"No resources found in {where}.", file=sys.stderr)
    else:
        print(table(items, wide=args.output == "wide", all_namespaces=args.all_namespaces))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from kubesloth.client import LogFollower

    conn = _conn(args)
    conn.must_get(args.name)
    follower = LogFollower(conn, args.name, local=args.local)
    if args.follow:
        follower.follow(args.timeout)
    elif follower.print_all() == 0:
        print(f"{args.prog}: {args.name} has no trainer pod (yet)", file=sys.stderr)
        return 1
    return 0


USER_COMMANDS = {"submit", "status", "logs", "wait", "get"}


def _add_connection_flags(parser: argparse.ArgumentParser, suppress: bool) -> None:
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument("--kubeconfig", default=default, help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config)")
    parser.add_argument("--context", default=default, help="kubeconfig context (default: the current one)")
    parser.add_argument("-n", "--namespace", default=default, help="namespace (default: the context's, else default)")


def _add_user_commands(sub, prog: str) -> None:
    from kubesloth.api.v1alpha1 import Phase

    def command(name: str, func, **kwargs) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, **kwargs)
        _add_connection_flags(parser, suppress=True)
        parser.set_defaults(func=func, prog=f"{prog} {name}")
        return parser

    def follow_flags(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--timeout", type=float, default=None, help="give up after this many seconds (exit 124)")
        parser.add_argument("--interval", type=float, default=1.0, help="seconds between reads (default 1)")
        parser.add_argument("--plain-every", type=float, default=10.0,
                            help="not on a terminal: a progress line at most every N seconds (default 10)")

    submit = command("submit", cmd_submit, help="apply a FineTuneJob file and follow it to the end",
                     description="Apply (server-side) a FineTuneJob file and follow it: progress on one updating "
                                 "line (plain lines when not a terminal). Exit 0 Succeeded, 1 Failed, 3 refused, "
                                 "124 timeout.")
    submit.add_argument("file", help="a FineTuneJob YAML")
    submit.add_argument("--replace", action="store_true",
                        help="delete an existing FineTuneJob of that name first (a finished run runs again)")
    submit.add_argument("-d", "--detach", action="store_true", help="apply and return; do not follow")
    follow_flags(submit)

    status = command("status", cmd_status, help="phase, conditions, progress, estimate, checkpoint and output")
    status.add_argument("name")
    status.add_argument("-o", "--output", choices=["json", "yaml"], help="the status object as JSON or YAML")

    logs = command("logs", cmd_logs, help="the trainer's log, every attempt (-f: follow to the end)")
    logs.add_argument("name")
    logs.add_argument("-f", "--follow", action="store_true", help="follow the log until the run ends")
    where = logs.add_mutually_exclusive_group()
    where.add_argument("--local", dest="local", action="store_true", default=None,
                       help="read the local node agent's log files (default: when a Node names them)")
    where.add_argument("--api", dest="local", action="store_false", help="read through the API's pods/log")
    logs.add_argument("--timeout", type=float, default=None, help="with -f: give up after this many seconds")

    wait = command("wait", cmd_wait, help="wait for a phase (default Succeeded); exit 0 when reached")
    wait.add_argument("name")
    wait.add_argument("--for", dest="for_phase", default="Succeeded", choices=[p.value for p in Phase],
                      help="the phase to wait for (default Succeeded)")
    wait.add_argument("--progress", action="store_true", help="print progress while waiting")
    follow_flags(wait)

    get = command("get", cmd_get, help="FineTuneJobs as a table (kubectl get ftj)")
    get.add_argument("names", nargs="*", metavar="NAME")
    get.add_argument("-A", "--all-namespaces", action="store_true")
    get.add_argument("-o", "--output", choices=["wide", "json", "yaml", "name"])

def build_parser(prog: str = "kubesloth") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__)
    parser.add_argument("--version", action="version", version=f"{prog} {__version__}")
    _add_connection_flags(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_user_commands(sub, prog)

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


def main(argv: list[str] | None = None, prog: str = "kubesloth") -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["operator"] and not {"-h", "--help"} & set(argv[1:]):
        # Everything after `operator` goes to `kopf run` verbatim (argparse would reorder options and values).
        args = argparse.Namespace(func=cmd_operator, kopf_args=argv[1:])
    else:
        args = build_parser(prog).parse_args(argv)
    try:
        return args.func(args)
    except subprocess.CalledProcessError as err:
        print(f"{prog}: command failed ({err.returncode}): {shlex.join(map(str, err.cmd))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if getattr(args, "command", None) in USER_COMMANDS:
            name = getattr(args, "name", None) or "NAME"
            print(f"\n{prog}: interrupted; the FineTuneJob goes on in the cluster ({prog} status {name})",
                  file=sys.stderr)
            return 130
        raise
    except Exception as err:
        from kubesloth.client import ClientError

        if isinstance(err, ClientError):
            print(f"{prog}: {err}", file=sys.stderr)
            return err.code
        raise


def kubectl_main() -> int:
    """`kubectl sloth ...`: kubectl finds the `kubectl-sloth` executable on PATH and passes the rest verbatim."""
    return main(prog="kubectl sloth")


if __name__ == "__main__":
    raise SystemExit(main())
