"""visiontune-ui: the MLflow UI over this project's store, on localhost, opening on the training runs."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Sequence

from visiontune import commands

# The UI only serves the store: no telemetry, no background job runners (they also slow its start).
QUIET = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    # The server's own libraries warn about their deprecations: nothing a user of the UI can act on.
    # (Starlette's is a UserWarning, matched by the start of its text.)
    "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore:starlette.middleware.wsgi is deprecated",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="visiontune-ui", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: localhost only)")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--experiment", default="visiontune", help="experiment to open first")
    commands.add_store_option(parser, "serve")
    args = parser.parse_args(argv)

    from visiontune import store

    uri = commands.store_uri(parser, args)
    if store.is_server(uri):  # it serves its own UI, to everyone who logs to it
        page = _first_page(uri, uri.rstrip("/"), args.experiment)
        print(f"{uri} is an MLflow server with a UI of its own; nothing to start here")
        print(f"open {page}")
        return 0
    if not _can_listen(args.host, args.port):
        print(
            f"visiontune-ui: error: port {args.port} on {args.host} is taken: pass --port N", file=sys.stderr
        )
        return 1
    # Upgrading an older store here, under visiontune's lock, keeps the UI's own start-up from
    # migrating it while a training run opens it too.
    page = _first_page(uri, f"http://{args.host}:{args.port}", args.experiment)
    print(f"serving {uri}")
    print(f"open {page}", flush=True)
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri]
    command += ["--host", args.host, "--port", str(args.port), "--workers", "1"]
    os.execvpe(sys.executable, command, os.environ | QUIET)
    return 0  # not reached: the MLflow UI replaces this process


def _first_page(uri: str, base: str, experiment: str) -> str:
    """The UI's page of the experiment's runs, or its front page where the store has no such experiment."""
    from visiontune import store

    found = store.open_store(uri).get_experiment_by_name(experiment)
    return commands.experiment_url(base, found.experiment_id) if found else base


def _can_listen(host: str, port: int) -> bool:
    """Whether a server could listen on host:port now (as uvicorn does, reusing TIME_WAIT ports)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


if __name__ == "__main__":
    sys.exit(main())
