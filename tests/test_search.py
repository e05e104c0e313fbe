"""visiontune-search in this process: the search space read and checked, trials handed out from a real
journal file (capped, re-queued when their worker died), the summary's table and Optuna plots, the
old `visiontune-train -m search=...` pointed at the new command."""

from __future__ import annotations

import dataclasses
import os
import sys

import pytest

from helpers import compose_cfg
from visiontune import VisiontuneError, train
from visiontune.search import space, study, summary

SPACE = ("~search.space.batch_size", "+search.space.optimizer.momentum={type: float, low: 0.8, high: 0.99}")


def test_the_space_reads_every_distribution_with_its_dotted_key():
    cfg = compose_cfg("search=models", *SPACE[1:], "search.pruner=hyperband", "epochs=4")
    settings = space.read(cfg, "models", trials=7)
    assert settings.trials == 7, "--trials wins over search.trials"
    assert settings.space["model"].choices == ("squeezenet", "resnet", "densenet")
    assert settings.space["optimizer.lr"] == space.Distribution("float", low=1e-4, high=1e-1, log=True)
    assert settings.space["optimizer.momentum"].low == 0.8
    assert space.pruner(settings).__class__.__name__ == "HyperbandPruner"
    assert space.SearchSettings.from_json(settings.to_json()) == settings, "what a worker receives"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ((), "visiontune-search needs a search space: give search=<name>, one of basic, models"),
        (("search=basic", "search.pruner=asha"), "search.pruner=asha is not one of median, hyperband, none"),
        (
            ("search=basic", "+search.space.optimizer.momentm={type: float, low: 0.8, high: 0.9}"),
            "unknown key optimizer.momentm; did you mean optimizer.momentum",
        ),
        (
            (
                "search=basic",
                "~search.space.optimizer.lr",
                "+search.space.optimizer.lr={type: float, low: 1, high: 0}",
            ),
            "search.space.optimizer.lr: low=1 and high=0 must be numbers with low < high",
        ),
        (
            ("search=basic", "+search.space.seed={type: uniform}"),
            "search.space.seed={'type': 'uniform'}: give a",
        ),
    ],
)
def test_a_bad_search_setting_is_one_line_naming_it(overrides, message):
    with pytest.raises(VisiontuneError, match="^" + message.replace("(", r"\(").replace("?", r"\?")):
        space.read(compose_cfg(*overrides), "basic", None)


@pytest.fixture
def plan(tmp_path):
    return study.Plan(str(tmp_path / "journal.log"), "s", str(tmp_path / "s"), [], "sqlite:///unused.db")


@pytest.fixture(params=["journal", "database"])
def any_plan(request, plan, tmp_path):
    """A journal file, or a database URL (SQLite here; PostgreSQL and MySQL go the same way)."""
    if request.param == "journal":
        return plan
    return dataclasses.replace(plan, storage=f"sqlite:///{tmp_path / 'optuna.db'}")


def test_workers_get_no_more_trials_than_the_study_has(any_plan):
    plan = any_plan
    opened = study.open_study(plan)
    asked = []
    for _ in range(2):
        asked.append(study.next_trial(opened, plan, 2))
        # As if a worker on another machine trained it: alive, its heartbeat fresh.
        asked[-1].set_user_attr(study.PROCESS, "elsewhere:4242@1")
    first, second = asked
    assert (first.number, second.number) == (0, 1)
    assert study.next_trial(opened, plan, 2) is None, "two are running: none left to hand out"
    opened.tell(first, 0.5)
    assert study.Counts.of(opened) == study.Counts(done=1, running=1, waiting=0)
    assert not study.Counts.of(opened).finished(2)


def test_a_trial_whose_worker_died_is_queued_again_with_its_values(plan):
    opened = study.open_study(plan)
    trial = study.next_trial(opened, plan, 1)
    lr_space = {"optimizer.lr": space.Distribution("float", 1e-5, 1e-1, log=True)}
    lr = space.suggest(trial, lr_space)
    # The worker's process tag names a pid no process has: it died (kill -9) mid-trial.
    trial.set_user_attr(study.PROCESS, study.store.this_process().replace(f":{os.getpid()}@", ":999999999@"))

    again = study.next_trial(opened, plan, 1)
    assert again is not None and again.number == 1
    assert space.suggest(again, lr_space) == lr, "the same values"
    assert again.user_attrs[study.FIRST] == 0, "under its first number: its run and folder"
    dead = opened.get_trials()[0]
    assert dead.state.name == "FAIL" and dead.user_attrs[study.REQUEUED]
    opened.tell(again, 1.0)
    assert study.Counts.of(opened).finished(1), "the re-queued trial counts once"


def test_the_summary_has_optunas_plots_and_every_trial(plan, tmp_path):
    opened = study.open_study(plan)
    for value in (0.5, 0.75, 1.0):
        trial = opened.ask()
        trial.suggest_float("optimizer.lr", 1e-5, 1e-1, log=True)
        trial.suggest_categorical("batch_size", [4, 8])
        trial.set_user_attr(study.RUN_ID, f"run{value}")
        opened.tell(trial, value)
    summary.write_plots(opened, tmp_path / "plots")
    assert {p.name for p in (tmp_path / "plots").iterdir()} == set(summary.PLOTS)
    table = summary.trials_table(opened).splitlines()
    assert table[0] == "trial,state,value,batch_size,optimizer.lr,run_id"
    assert table[3].startswith("2,COMPLETE,1.0,") and table[3].endswith(",run1.0")


def test_visiontune_train_points_a_search_at_visiontune_search(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["visiontune-train", "-m", "search=optuna"])
    with pytest.raises(SystemExit, match="search=optuna: searches run with visiontune-search"):
        train.cli()
