"""Where a trainer process's start-up time goes: a wall-clock sampler of the main thread's Python stack.

Bench-only. On when KUBESLOTH_BENCH_SAMPLE names a file prefix and the process runs `kubesloth.trainer`; put this
directory first on PYTHONPATH (bench/h200.sh does for `SAMPLE=1`). Every 10 ms a thread records the main
thread's stack (file:function, outermost first) with the time since the process started; a C call that released
the GIL (a CUDA sync, a read) shows as the Python frame that made it. The samples are written, replaced each
2 s and at exit (the bench kills the trainer after its last timed step), to PREFIX.PID.jsonl:
one {"t": seconds, "stack": [...]} per line. bench/startup_report.py turns them into a table.
"""

import os
import sys

_PREFIX = os.environ.get("KUBESLOTH_BENCH_SAMPLE")


def _frame_name(code) -> str:
    path = code.co_filename
    for marker in ("/site-packages/", "/site/", "/shim/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{code.co_name}"


def _start(prefix: str) -> None:
    import json
    import threading
    import time

    t0 = time.monotonic()
    main_id = threading.main_thread().ident
    samples: list[tuple[float, tuple[str, ...]]] = []
    names: dict = {}
    out = f"{prefix}.{os.getpid()}.jsonl"

    def flush() -> None:
        tmp = out + ".tmp"
        with open(tmp, "w") as fh:
            for t, stack in list(samples):
                fh.write(json.dumps({"t": round(t, 3), "stack": stack}) + "\n")
        os.replace(tmp, out)

    def run() -> None:
        last_flush = time.monotonic()
        while True:
            time.sleep(0.01)
            frame = sys._current_frames().get(main_id)
            stack = []
            while frame is not None:
                code = frame.f_code
                name = names.get(code)
                if name is None:
                    name = names[code] = _frame_name(code)
                stack.append(name)
                frame = frame.f_back
            now = time.monotonic()
            samples.append((now - t0, tuple(reversed(stack))))
            if now - last_flush > 2.0:
                flush()
                last_flush = now

    import atexit

    atexit.register(flush)
    threading.Thread(target=run, name="bench-startup-sampler", daemon=True).start()


if _PREFIX and "kubesloth.trainer" in " ".join(getattr(sys, "orig_argv", sys.argv or [])):
    _start(_PREFIX)
