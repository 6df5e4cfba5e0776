"""A SIGTERM after the trainer decided its outcome (the termination message is written) does not change its exit
code. Python's finalization puts the default action back for every signal with a Python handler, so a SIGTERM
while the interpreter shuts down (torch's teardown takes a while) killed a finished run with 143: a failed pod, a
retry of a run that had succeeded. Seen end to end: a SIGTERM 0.1 s after "done ... trained 24/24 steps"."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from .conftest import trainer_env

LATE_SIGTERM = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    from kubesloth.trainer.main import main
    code = main(["--config", "/nonexistent/finetunejob.yaml"])  # exit 2, decided at once
    class SlowTeardown:  # a __main__ global: dropped late in finalization, after the signal handlers are reset
        def __del__(self):
            time.sleep(1.5)
    slow = SlowTeardown()
    subprocess.Popen(["sh", "-c", f"sleep 0.5; kill -TERM {os.getpid()}"])  # lands during the teardown
    sys.exit(code)
""")


def test_a_sigterm_during_the_interpreters_teardown_keeps_the_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-c", LATE_SIGTERM], env=trainer_env(tmp_path), cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert "InvalidConfig, exit 2" in proc.stdout
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
