"""What the thin command lines over a store share: the --tracking-uri option and opening its store."""

from __future__ import annotations

import argparse
from pathlib import Path


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
