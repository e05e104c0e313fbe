"""The command lines beside the library, and what they share: the --tracking-uri and MODEL arguments,
opening the store, and the UI's address of a run.

predict, evaluate and export read a logged model; compare, ui and runs read a store. Each module
here is one command (visiontune-<name>); the library never imports them. What they share lives in
this file rather than a module of its own: every command imports the package anyway, and it holds
nothing heavier than argparse, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# MLflow 3.17's UI ignores the experiment's kind tag and opens on its GenAI view unless the
# page's URL (or the browser's remembered sidebar switch) asks for Model training.
TRAINING_VIEW = "workflowType=machine_learning"


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """The positional MODEL of the commands that read a logged model (predict, evaluate, export)."""
    parser.add_argument(
        "model",
        metavar="MODEL",
        help="a run id, runs:/<id>/model, models:/<name>/<version>, models:/<name>@<alias> or a model folder",
    )


def add_store_option(parser: argparse.ArgumentParser, verb: str = "read") -> None:
    parser.add_argument(
        "--tracking-uri", help=f"store to {verb} (default: $MLFLOW_TRACKING_URI, else ./outputs/mlflow.db)"
    )


def store_uri(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The store the command works on; a local one that does not exist yet ends the command."""
    from visiontune import store

    uri = store.tracking_uri(args.tracking_uri, Path.cwd())
    if store.missing_store(uri):
        parser.error(f"no MLflow store at {uri}: run visiontune-train here first, or pass --tracking-uri")
    try:
        store.check_server(uri)
    except store.StoreError as err:  # one line, not the usage: the command line itself was right
        parser.exit(1, f"{parser.prog}: error: {err}\n")
    return uri


def model_store_uri(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The store a MODEL argument is looked up in; a local model folder needs none."""
    from visiontune import store

    if Path(args.model).is_dir():
        return store.tracking_uri(args.tracking_uri, Path.cwd())
    return store_uri(parser, args)


def experiment_url(base: str, experiment_id: str, run_id: str | None = None) -> str:
    """The MLflow UI's page of an experiment's runs (or of one run), in its Model training view."""
    path = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "/runs")
    return f"{base}/{path}?{TRAINING_VIEW}"
