"""Everything that talks to MLflow: where the store is, what a run writes, sweeps' parents, tag names.

Other modules read runs through a client from `open_store`; none writes to MLflow but this package.
Its modules, each importing only those above it:

    tags        the tag vocabulary: every key a run is tagged with, named once
    interrupts  signals held while the store is written, so no write is cut in half
    location    the URI and its credentials, the server probe, the SQLite file and its lock
    writes      a run whose status is true, params, metrics, files and models
    parents     a sweep's parent run and children; the process writing a run, alive or dead

Callers use `store.<name>` for what is re-exported here, and `store.tags.<NAME>` for tag keys.
"""

from visiontune.store import outage, tags
from visiontune.store.interrupts import deferred_interrupt, hold_during_writes
from visiontune.store.location import (
    StoreError,
    artifact_location,
    check_server,
    ensure_experiment,
    is_server,
    missing_store,
    network_mount,
    open_store,
    sqlite_path,
    tracking_uri,
    warn_if_network_store,
)
from visiontune.store.parents import (
    ParentRun,
    child_for,
    children_of,
    holding,
    mark_failed,
    process_state,
    this_process,
)
from visiontune.store.writes import (
    PARAM_VALUE_LIMIT,
    TAG_VALUE_LIMIT,
    RunStart,
    add_artifact,
    aliased_version,
    delete_tag,
    end_run,
    flatten,
    load_model,
    log_datasets,
    log_figure,
    log_files,
    log_metrics,
    log_model,
    log_params,
    logged_steps,
    register_model,
    set_tags,
    shorten,
    split_digests,
    tag_version,
    tracked_run,
)

__all__ = [
    "PARAM_VALUE_LIMIT",
    "TAG_VALUE_LIMIT",
    "ParentRun",
    "RunStart",
    "StoreError",
    "add_artifact",
    "aliased_version",
    "delete_tag",
    "artifact_location",
    "check_server",
    "child_for",
    "children_of",
    "deferred_interrupt",
    "end_run",
    "ensure_experiment",
    "flatten",
    "hold_during_writes",
    "is_server",
    "load_model",
    "log_datasets",
    "log_figure",
    "log_files",
    "log_metrics",
    "log_model",
    "log_params",
    "logged_steps",
    "mark_failed",
    "missing_store",
    "network_mount",
    "open_store",
    "holding",
    "process_state",
    "register_model",
    "set_tags",
    "shorten",
    "split_digests",
    "sqlite_path",
    "outage",
    "tag_version",
    "tags",
    "this_process",
    "tracked_run",
    "tracking_uri",
    "warn_if_network_store",
]
