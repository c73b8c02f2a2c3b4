"""Run llama.cpp's own HTTP server (through the `xllamacpp` wheel) on loopback.

    python scripts/llama_server.py --model FILE --port N [--ctx 4096] [--threads 2]

Runs in the local model server's venv (see `scripts/ensure_llm_server.sh`), not the
project's. xllamacpp starts llama.cpp's C++ server (its `tools/server`) in a background
thread; this process only sets its parameters, prints one line when it listens, and
stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import signal
import threading
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--alias", default="local")
    args = parser.parse_args()

    import xllamacpp

    started = time.monotonic()
    params = xllamacpp.CommonParams()
    params.model.path = args.model
    params.model_alias = args.alias
    params.hostnames = ["127.0.0.1"]  # loopback only (its default too, set explicitly)
    params.port = args.port
    params.n_ctx = args.ctx
    params.n_parallel = args.parallel
    params.cpuparams.n_threads = args.threads
    params.cpuparams_batch.n_threads = args.threads
    server = xllamacpp.Server(params)
    print(
        f"listening {server.listening_address} model load {time.monotonic() - started:.2f} s",
        flush=True,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


if __name__ == "__main__":
    main()
