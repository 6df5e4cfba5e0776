"""A stand-in trainer for tests/e2e/test_hostile_trainer.py: serves /metrics where the operator looks for it
(KUBESLOTH_METRICS_ADDR:KUBESLOTH_METRICS_PORT) and trains nothing; how it answers depends on the FineTuneJob's
name (KUBESLOTH_FINETUNEJOB):

  *drip*       a 200 and then one byte a second, for ever (the fault campaign's slow trainer);
  *huge-step*  kubesloth_train_step 1e308 (beyond the CRD's int64 step);
  otherwise    a steady run: step = whole seconds since start, of spec.training.maxSteps.

It appends one line per /metrics request to <output>/scrapes.txt, so the test knows the operator came, and runs
until the pod is deleted. Passed as `python -c` source (the node agent maps the pod's /tmp).
"""

import http.server
import os
import time

import yaml

config = yaml.safe_load(open(os.environ["KUBESLOTH_CONFIG"]))
name, namespace = os.environ["KUBESLOTH_FINETUNEJOB"], os.environ["KUBESLOTH_NAMESPACE"]
output = os.path.join(os.environ["KUBESLOTH_PVC_ROOT"], config["spec"]["output"]["destination"][len("pvc://"):])
os.makedirs(output, exist_ok=True)
planned = int(config["spec"]["training"]["maxSteps"])
started = time.monotonic()


class Metrics(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        with open(os.path.join(output, "scrapes.txt"), "a") as log:
            log.write(f"{time.time():.3f}\n")
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        if "drip" in name:
            while True:  # until the operator hangs up (BrokenPipe ends this thread)
                self.wfile.write(b"#")
                self.wfile.flush()
                time.sleep(1)
        step = "1e+308" if "huge-step" in name else str(min(int(time.monotonic() - started), planned))
        labels = f'{{namespace="{namespace}",finetunejob="{name}"}}'
        self.wfile.write(f"# TYPE kubesloth_train_step gauge\nkubesloth_train_step{labels} {step}\n"
                         f"# TYPE kubesloth_train_steps_total_planned gauge\n"
                         f"kubesloth_train_steps_total_planned{labels} {planned}\n".encode())

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer((os.environ["KUBESLOTH_METRICS_ADDR"],
                                          int(os.environ["KUBESLOTH_METRICS_PORT"])), Metrics)
server.daemon_threads = True
server.serve_forever()
