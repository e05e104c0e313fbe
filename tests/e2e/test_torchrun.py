"""Data-parallel training under torchrun (gloo on the CPU): one run, one folder, the same weights
on every rank, val accuracy as one process computes it, restarts that continue the same run."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from helpers import cli_env, has_metric, make_image_folder, run_cli, store_runs

TORCHRUN = Path(sys.executable).parent / "torchrun"
FAST = (
    "mode=scratch",
    "model=squeezenet",
    "device=cpu",
    "num_workers=0",
    "batch_size=4",
    "model.input_size=64",
)


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory) -> Path:
    """9 val images: two ranks get 5 and 4, so a padded val shard would count one image twice.

    Plus a truncated val image (its header reads, its pixels do not), 4th in order: rank 1's."""
    root = make_image_folder(
        tmp_path_factory.mktemp("odd") / "odd", {"train": 4, "val": 3}, classes=("ants", "bees", "wasps")
    )
    whole = (root / "val" / "ants" / "ants_0.jpg").read_bytes()
    (root / "val" / "ants" / "cut.jpg").write_bytes(whole[: whole.index(b"\xff\xda") + 20])
    return root


def torchrun_args(*args: str, restarts: int = 0, script: str = "-m visiontune.train") -> list[str]:
    return [
        str(TORCHRUN),
        "--standalone",
        "--nproc_per_node=2",
        f"--max-restarts={restarts}",
        *script.split(),
        *args,
    ]


@contextlib.contextmanager
def torchrun(cwd: Path, *args: str, **options) -> Iterator[subprocess.Popen]:
    """torchrun in `cwd`, its stderr read by communicate(); none of its processes outlives the block
    (its workers have sessions of their own, so killing torchrun alone would leave them running)."""
    process = subprocess.Popen(
        torchrun_args(*args, **options),
        cwd=cwd,
        env=cli_env(cwd),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            with contextlib.suppress(OSError):
                for pid in worker_pids(process.pid).values():
                    os.kill(pid, signal.SIGKILL)
            process.kill()
            process.communicate()


@pytest.mark.parametrize("mode", ["scratch", "feature_extract"])
def test_two_ranks_record_one_run_in_one_folder_with_one_process_val_accuracy(
    tmp_path, odd_folder, standin_weights, mode
):
    """feature_extract trains its head apart from the frozen backbone: DDP wraps that part alone."""
    data = ("data=imagefolder", f"data.root={odd_folder}", "data.skip_bad_images=true")
    weights = f"model.weights={standin_weights('squeezenet1_0')}"
    # scratch also accumulates (gradients reduced once per step: no_sync), clips and averages the weights.
    loop = ("accumulate_batches=2", "clip_grad_norm=1.0", "ema.decay=0.9") if mode == "scratch" else ()
    with torchrun(tmp_path, *FAST, f"mode={mode}", weights, *data, "epochs=2", *loop) as process:
        stderr = process.communicate(timeout=300)[1]
    assert process.returncode == 0, stderr[-3000:]
    (run,) = store_runs(tmp_path / "outputs" / "mlflow.db")
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert (params["world_size"], params["batch_size_per_rank"], params["global_batch_size"]) == (
        "2",
        "4",
        "8",
    )

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_acc")] == [1, 2]
    # One output folder, written by rank 0 alone; rank 1's console lines are warnings only.
    (folder,) = (tmp_path / "outputs" / "runs").glob("*/*")
    assert sorted(p.name for p in folder.iterdir()) == [".hydra", "train.log"]
    assert stderr.count("epoch 1/2") == 1
    rank_1 = [line for line in stderr.splitlines() if line.startswith("[rank 1]")]
    assert rank_1 and all("skipping image that does not decode" in line for line in rank_1)
    assert run.data.metrics["skipped_images"] == 1, "rank 1's skip, summed across ranks"
    assert "final weights identical on all 2 ranks" in (folder / "train.log").read_text()
    # The logged (best) model, scored by one process on the whole val folder.
    assert one_process_val_acc(run.info.run_id, tmp_path, odd_folder) == run.data.metrics["best_val_acc"]


def one_process_val_acc(run_id: str, cwd: Path, root: Path) -> float:
    import mlflow

    from visiontune import data, engine, store
    from visiontune.runtime import Runtime

    mlflow.set_tracking_uri(f"sqlite:///{cwd / 'outputs' / 'mlflow.db'}")
    module = store.load_model(f"runs:/{run_id}/model")  # takes normalised tensors
    _, samples = data.find_samples(root)
    settings = data.LoaderSettings(input_size=64, batch_size=4, num_workers=0, seed=0, skip_bad=True)
    cpu = torch.device("cpu")
    runtime = Runtime(cpu, data.Normalizer(cpu))
    return engine.evaluate(
        module, data.build_loaders(samples, settings)["val"], torch.nn.CrossEntropyLoss(), runtime
    ).acc


def worker_pids(launcher: int) -> dict[int, int]:
    """rank -> pid of the workers torchrun started (read from /proc: no psutil here)."""
    children = Path(f"/proc/{launcher}/task/{launcher}/children").read_text().split()
    ranks = {}
    for pid in map(int, children):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next((int(v[5:]) for v in environ if v.startswith(b"RANK=")), None)
        if rank is not None:
            ranks[rank] = pid
    return ranks


def test_a_killed_worker_is_restarted_and_the_same_run_finishes(tmp_path, tiny_folder):
    """torchrun --max-restarts=1 after a worker is SIGKILLed: all ranks restart from the last
    checkpoint, in the same MLflow run, which then FINISHES with each epoch logged once.
    Run through the console script, the other way torchrun starts visiontune."""
    epochs = 12
    args = (
        *FAST,
        "mode=scratch",
        "data=imagefolder",
        f"data.root={tiny_folder}",
        f"epochs={epochs}",
        "model.input_size=96",
    )
    script = str(Path(sys.executable).parent / "visiontune-train")
    with torchrun(tmp_path, *args, restarts=1, script=script) as process:
        deadline = time.monotonic() + 120
        while not has_metric(tmp_path / "outputs" / "mlflow.db", "val_acc"):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(worker_pids(process.pid)[1], signal.SIGKILL)
        stderr = process.communicate(timeout=240)[1]
    assert process.returncode == 0, stderr[-3000:]
    assert "torchrun restarted the workers: continuing MLflow run" in stderr
    (run,) = store_runs(tmp_path / "outputs" / "mlflow.db")
    assert run.info.status == "FINISHED"

    from mlflow.tracking import MlflowClient

    history = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}").get_metric_history(
        run.info.run_id, "val_acc"
    )
    assert sorted(m.step for m in history) == list(range(1, epochs + 1))


TORCHRUN_RANK = {"WORLD_SIZE": "2", "LOCAL_RANK": "0", "TORCHELASTIC_RUN_ID": "test"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("-m", "epochs=1,2"),
            "error: -m/--multirun cannot run under torchrun: start the sweep without torchrun",
        ),
        (("epoch=3",), "error: unknown key epoch; did you mean epochs?"),
    ],
    ids=["multirun", "bad-override"],
)
def test_under_torchrun_a_refusal_is_one_line_from_rank_0_alone(tmp_path, args, message):
    """Set torchrun's variables by hand: the refusal comes before any process group."""
    answers = {}
    for rank in ("0", "1"):
        env = cli_env(tmp_path) | TORCHRUN_RANK | {"RANK": rank}
        answers[rank] = run_cli(tmp_path, *args, module="visiontune.train", env=env, timeout=60)
    assert answers["0"].returncode == answers["1"].returncode == 1
    assert answers["0"].stderr.strip().splitlines() == [message]
    assert answers["1"].stderr.strip() == ""
    assert not (tmp_path / "outputs").exists()
