"""A stand-in trainer for lifecycle tests where what trains does not matter (deadline, suspend, TTL, restarts).

Set as the operator's trainer command (KUBESLOTH_OPERATOR_TRAINER_COMMAND="python -c <this file>"), it reads
the mounted FineTuneJob like the trainer does (KUBESLOTH_CONFIG, KUBESLOTH_PVC_ROOT), appends one line per start to
<output>/starts.txt, runs `spec.training.maxSteps` seconds and exits 0; SIGTERM -> exit 6 (Interrupted) with a
termination message, as the real trainer does after its checkpoint.
"""

import os
import signal
import sys
import time

import yaml

config = yaml.safe_load(open(os.environ["KUBESLOTH_CONFIG"]))
destination = config["spec"]["output"]["destination"]
assert destination.startswith("pvc://"), destination
output = os.path.join(os.environ["KUBESLOTH_PVC_ROOT"], destination[len("pvc://"):])
os.makedirs(output, exist_ok=True)
with open(os.path.join(output, "starts.txt"), "a") as starts:
    token = "token:set" if os.environ.get("HF_TOKEN") else "token:none"  # whether, never what
    starts.write(f"{os.environ.get('HOSTNAME', '?')} {os.environ.get('KUBESLOTH_METRICS_ADDR', '?')} {token}\n")


def interrupted(signum, frame):
    with open(os.environ["KUBESLOTH_TERMINATION_LOG"], "w") as log:
        log.write("Interrupted: stopped by SIGTERM")
    sys.exit(6)


signal.signal(signal.SIGTERM, interrupted)
time.sleep(float(config["spec"]["training"].get("maxSteps") or 3600))
print("sleeper done")
