"""Transfer-learning recipes: layer groups, staged unfreezing, layer-wise rates, one-cycle, no decay
on norms and biases, deterministic runs, and the four-mode comparison."""

import csv

import pytest
import torch
from torch import nn

from helpers import (
    ARCHS,
    FAST,
    SPECS,
    compose_cfg,
    cpu_training,
    input_size_for,
    prepare_model,
    run_cli,
    store_runs,
)
from visiontune import checkpoint, config, engine, optim


@pytest.mark.parametrize("model_name", ARCHS)
def test_layer_groups_cover_every_parameter_once_from_input_to_head(model_name):
    prepared = prepare_model(model_name, "scratch")
    module, spec = prepared.module, SPECS[model_name]
    assert tuple(prepared.groups) == spec.group_names == ("early", "middle", "late", "head")
    grouped = [id(p) for params in prepared.groups.values() for p in params]
    assert sorted(grouped) == sorted(id(p) for p in module.parameters()), "each parameter exactly once"
    assert all(prepared.groups.values()), "no empty group"
    # Input to head: the groups' layers first run in group order in a forward pass.
    group_of = {id(p): name for name, params in prepared.groups.items() for p in params}
    order: list[str] = []

    def note(layer, *_):
        for p in layer.parameters(recurse=False):
            if not order or order[-1] != group_of[id(p)]:
                order.append(group_of[id(p)])

    hooks = [m.register_forward_hook(note) for m in module.modules()]
    module.eval()  # inception's auxiliary head, in `head` but fed from `middle`, stays out of the order
    size = input_size_for(model_name)
    with torch.no_grad():
        module(torch.rand(1, 3, size, size))
    for hook in hooks:
        hook.remove()
    firsts = list(dict.fromkeys(order))
    assert firsts == list(spec.group_names), f"groups first run in the order {firsts}"


def test_a_layer_group_naming_a_missing_module_is_refused():
    from visiontune import VisiontuneError, models

    cfg = compose_cfg("model=resnet", "model.layer_groups.late=[layer4, layer5]")
    spec = config.model_spec(cfg.model)
    with pytest.raises(VisiontuneError, match="resnet18 has no module 'layer5'"):
        models.layer_groups(models.build_model(spec, 2, None), spec)


def test_trainable_from_must_name_a_group():
    from visiontune import VisiontuneError

    cfg = compose_cfg("model=resnet", "mode=finetune", "mode.trainable_from=layer3")
    with pytest.raises(VisiontuneError, match="use one of early, middle, late, head"):
        config.read(cfg)


def test_staged_mode_unfreezes_group_by_group_and_keeps_its_rates(standin_weights):
    overrides = ("mode.freeze_epochs=1", "mode.unfreeze_every=1", "mode.trainable_from=middle")
    prepared = prepare_model("squeezenet", "staged", standin_weights, 2, *overrides)
    cfg = compose_cfg("optimizer=sgd", "optimizer.lr=0.01", "optimizer.lr_decay=0.5")
    optimizer = optim.build_optimizer(config.read(cfg).optim, prepared)
    rates = {group["name"]: group["lr"] for group in optimizer.param_groups}
    assert rates == {"middle": 0.0025, "late": 0.005, "head": 0.01}, "early never trains: not in it"
    images = torch.rand(4, 3, 64, 64)
    loaders = {"train": [(images, torch.tensor([0, 1, 0, 1]))], "val": [(images, torch.tensor([0, 1, 0, 1]))]}
    snapshots, reports = [], []

    def on_epoch(report, progress):
        reports.append(report)
        snapshots.append({k: v.clone() for k, v in prepared.module.named_parameters()})

    before = {k: v.clone() for k, v in prepared.module.named_parameters()}
    engine.fit(cpu_training(prepared, optimizer, epochs=4), loaders, on_epoch=on_epoch)
    expected = [("head",), ("late", "head"), ("middle", "late", "head"), ("middle", "late", "head")]
    assert [r.trainable for r in reports] == expected
    assert [r.lrs for r in reports] == [rates] * 4, "one optimiser, its rates unchanged without a schedule"
    group_of = {
        name: group
        for group, params in prepared.groups.items()
        for name, p in prepared.module.named_parameters()
        if any(p is q for q in params)
    }
    for epoch, (previous, now) in enumerate(zip([before, *snapshots], snapshots, strict=False), start=1):
        changed = {group_of[k] for k in now if not torch.equal(previous[k], now[k])}
        assert changed == set(expected[epoch - 1]), f"epoch {epoch}: {changed} changed"


def test_a_resumed_staged_run_trains_the_unfrozen_groups(standin_weights, tmp_path):
    def training_for_run(epochs: int):
        prepared = prepare_model("squeezenet", "staged", standin_weights, 2, "mode.freeze_epochs=1")
        optimizer = optim.build_optimizer(config.read(compose_cfg("optimizer=adam")).optim, prepared)
        return cpu_training(prepared, optimizer, epochs=epochs)

    images, labels = torch.rand(4, 3, 64, 64), torch.tensor([0, 1, 0, 1])
    loaders = {"train": [(images, labels)], "val": [(images, labels)]}
    first = training_for_run(epochs=2)  # as if stopped after epoch 2, in stage two
    engine.fit(
        first,
        loaders,
        on_epoch=lambda r, p: checkpoint.save(
            tmp_path, first, p, {"run_id": "x", "config": {}, "metrics": []}
        ),
    )
    again = training_for_run(epochs=3)
    assert again.model.trainable == ("head",), "a new process starts in stage one"
    progress = checkpoint.restore(checkpoint.read(tmp_path), again)
    reports = []
    engine.fit(again, loaders, on_epoch=lambda r, p: reports.append(r), progress=progress)
    assert [r.epoch for r in reports] == [3]
    assert reports[0].trainable == ("early", "middle", "late", "head")
    assert all(p.requires_grad for p in again.model.module.parameters())


def test_adamw_leaves_norm_weights_and_biases_undecayed(standin_weights):
    prepared = prepare_model("resnet", "finetune", standin_weights, 2)
    cfg = compose_cfg("optimizer=adamw", "optimizer.weight_decay=0.5", "optimizer.lr=0.1")
    optimizer = optim.build_optimizer(config.read(cfg).optim, prepared)
    spared = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    module = prepared.module
    one_d = {id(p) for p in module.parameters() if p.ndim == 1}
    assert spared == one_d and {id(module.bn1.weight), id(module.fc.bias)} <= spared
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    for p in module.parameters():
        p.grad = torch.zeros_like(p)  # only the decay moves a weight
    optimizer.step()
    moved = {name for name, p in module.named_parameters() if not torch.equal(before[name], p)}
    assert moved == {name for name, p in module.named_parameters() if p.ndim > 1}

    kept = optim.build_optimizer(
        config.read(compose_cfg("optimizer=adamw", "optimizer.decay_norm_and_bias=true")).optim, prepared
    )
    assert all(g["weight_decay"] == 0.01 for g in kept.param_groups)


def test_one_cycle_steps_every_batch_and_peaks_at_each_groups_rate():
    layers = nn.Sequential(nn.Flatten(), nn.Linear(2, 2))
    optimizer = torch.optim.SGD(
        [{"params": [layers[1].weight], "lr": 0.1}, {"params": [layers[1].bias], "lr": 0.01}]
    )
    scheduler, per_batch = optim.build_scheduler(
        compose_cfg("scheduler=onecycle").scheduler, optimizer, epochs=4, steps_per_epoch=5
    )
    assert per_batch
    seen = []
    for _ in range(20):
        seen.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert seen[0] == pytest.approx([0.1 / 25, 0.01 / 25]), "starts at max / div_factor"
    peak = max(range(20), key=lambda step: seen[step][0])
    assert peak == 4 and seen[peak] == pytest.approx([0.1, 0.01]), "peaks at pct_start (0.25) of 20 steps"
    assert seen[-1][0] < 0.1 / 25 / 100, "anneals far below the start"


def sweep_rows(client, parent_id) -> list[dict]:
    path = client.download_artifacts(parent_id, "leaderboard.csv")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_the_four_mode_comparison_with_staged_unfreezing_and_one_cycle(
    tmp_path, tiny_folder, standin_weights
):
    """The README's comparison command: feature_extract, finetune, staged and scratch side by side."""
    from mlflow.tracking import MlflowClient

    data = ("data=imagefolder", f"data.root={tiny_folder}", *(o for o in FAST if not o.startswith("epochs")))
    result = run_cli(
        tmp_path,
        "-m",
        "model=squeezenet",
        f"model.weights={standin_weights('squeezenet1_0')}",
        "mode=feature_extract,finetune,staged,scratch",
        "scheduler=onecycle",
        "optimizer.lr_decay=0.3",
        "epochs=2",
        *data,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    store = tmp_path / "outputs" / "mlflow.db"
    runs = store_runs(store)
    (parent,) = [r for r in runs if r.data.tags.get("visiontune.sweep") == "parent"]
    children = {
        r.data.tags["mode"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    assert sorted(children) == ["feature_extract", "finetune", "scratch", "staged"]
    assert all(r.info.status == "FINISHED" for r in children.values())
    client = MlflowClient(f"sqlite:///{store}")
    rows = sweep_rows(client, parent.info.run_id)
    assert len(rows) == 4

    staged = children["staged"]
    history = {
        key: [m.value for m in client.get_metric_history(staged.info.run_id, key)]
        for key in ("trainable_groups", "lr", "lr_early")
    }
    assert history["trainable_groups"] == [1, 4], "the stage changes at epoch 2"
    assert "epoch 2: unfrozen, training early, middle, late, head" in result.stderr
    assert staged.data.params["lr.head"] == "0.001" and staged.data.params["lr.early"] == "2.7e-05"
    # One-cycle steps every batch: the lr logged as each epoch began is the schedule's at that step.
    steps_per_epoch = 3  # 12 training images, batch 4
    reference = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.001)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        reference,
        0.001,
        total_steps=2 * steps_per_epoch,
        pct_start=2 / 6,
        div_factor=25,
        final_div_factor=1e5,
    )
    # 6 steps in all: the warm-up takes 2 of them (0.25 x 6 would leave torch 0.5 of a step).
    expected = []
    for step in range(2 * steps_per_epoch):
        if step % steps_per_epoch == 0:
            expected.append(reference.param_groups[0]["lr"])
        reference.step()
        schedule.step()
    assert history["lr"] == pytest.approx(expected)
    assert history["lr_early"] == pytest.approx([lr * 0.3**3 for lr in expected])

    assert "| squeezenet-staged |" in result.stdout, "the leaderboard is printed at the end"
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"leaderboard.csv", "val_acc_overlay.png"} <= names, "the parent holds the comparison figure"


def test_two_deterministic_runs_log_identical_metrics(tmp_path, tiny_folder):
    data = ("data=imagefolder", f"data.root={tiny_folder}", *(o for o in FAST if not o.startswith("epochs")))
    args = (
        "model=squeezenet",
        "mode=scratch",
        "epochs=2",
        "deterministic=true",
        "mlflow.log_model=false",
        *data,
    )
    for _ in range(2):
        result = run_cli(tmp_path, *args)
        assert result.returncode == 0, result.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    runs = store_runs(tmp_path / "outputs" / "mlflow.db")
    assert len(runs) == 2 and all(r.data.params["deterministic"] == "True" for r in runs)
    client = MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    keys = ("train_loss", "train_acc", "val_loss", "val_acc")
    first, second = (
        {k: [m.value for m in client.get_metric_history(r.info.run_id, k)] for k in keys} for r in runs
    )
    assert first == second and len(first["train_loss"]) == 2
    assert {"version.torch", "version.visiontune", "data.train_digest"} <= set(runs[0].data.params)


def test_one_cycle_on_a_short_run_warms_up_over_two_steps_or_says_it_is_too_short():
    from visiontune import VisiontuneError

    cfg = compose_cfg("scheduler=onecycle").scheduler
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler, _ = optim.build_scheduler(cfg, optimizer, epochs=2, steps_per_epoch=2)  # torch: ÷0
    seen = []
    for _ in range(4):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen[1] == pytest.approx(0.1) and seen[0] < seen[1] and seen[3] < seen[1]
    with pytest.raises(VisiontuneError, match="needs at least 4 training steps, this run has 3"):
        optim.build_scheduler(cfg, optimizer, epochs=1, steps_per_epoch=3)
