"""champion.py: the gate a sweep's best child passes to take the registry alias, on a real SQLite
registry with logged models scored on real images. A whole sweep through the gate:
tests/e2e/test_sweep.py."""

from __future__ import annotations

import pytest

from helpers import SPECS, make_image_folder


def logged_run(uri: str, experiment_id: str, answer: int) -> str:
    """A run whose logged squeezenet answers class `answer` for every image; its run id."""
    import io

    import torch
    from PIL import Image

    from visiontune import models, store
    from visiontune.classifier import Classifier

    module = models.build_model(SPECS["squeezenet"], 2, None).eval()
    head = module.get_submodule(SPECS["squeezenet"].head)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([5.0, 0.0] if answer == 0 else [0.0, 5.0]))
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(jpeg, format="JPEG")
    with store.tracked_run(uri, store.RunStart(experiment_id, f"answers-{answer}", {})) as run:
        store.log_model(
            Classifier(module, ["ants", "bees"], 64, "squeezenet", "squeezenet1_0"), jpeg.getvalue()
        )
    return run.info.run_id


def test_the_gate_refuses_a_worse_challenger_and_force_moves_the_alias_anyway(tmp_path):
    from mlflow.tracking import MlflowClient

    from visiontune import champion, store

    data = make_image_folder(tmp_path / "data", {"val": 4})
    for extra in sorted((data / "val" / "bees").iterdir())[:2]:
        extra.unlink()  # 4 ants, 2 bees: "always ants" scores 4/6, "always bees" 2/6
    uri = store.tracking_uri(None, tmp_path)
    experiment_id = store.ensure_experiment(uri, "gate")
    good, worse = logged_run(uri, experiment_id, 0), logged_run(uri, experiment_id, 1)
    client = MlflowClient(uri)

    first = champion.crown(uri, good, champion.Gate("ants", "champion"), data)
    assert first.moved and first.decision.startswith("crowned: no champion")
    refused = champion.crown(uri, worse, champion.Gate("ants", "champion"), data)
    assert not refused.moved and refused.decision.startswith("refused")
    assert str(client.get_model_version_by_alias("ants", "champion").version) == first.version
    tags = {v: client.get_model_version("ants", v).tags for v in (first.version, refused.version)}
    assert float(tags[first.version][store.tags.GATE_ACCURACY]) == pytest.approx(4 / 6)
    assert float(tags[refused.version][store.tags.GATE_ACCURACY]) == pytest.approx(2 / 6)
    assert tags[refused.version][store.tags.GATE_DATA] == str((data / "val").resolve())
    assert "0.3333 against version 1's 0.6667" in tags[refused.version][store.tags.GATE_DECISION]

    forced = champion.crown(uri, worse, champion.Gate("ants", "champion", force=True), data)
    assert forced.moved and forced.version == refused.version, "the same version, not a new one"
    assert str(client.get_model_version_by_alias("ants", "champion").version) == refused.version


@pytest.mark.parametrize(("challenger", "moved"), [(0.74, True), (0.73, False), (0.70, False)])
def test_the_challenger_must_beat_the_champion_by_more_than_the_margin(challenger, moved):
    from visiontune import champion

    verdict = champion.decide(champion.Gate("m", "champion", margin=0.05), "2", challenger, "1", 0.68)
    assert verdict.moved is moved


def test_the_held_out_split_is_test_where_the_data_has_one(tmp_path):
    from visiontune import champion

    data = make_image_folder(tmp_path / "data", {"train": 1, "val": 1})
    assert champion.held_out(data) == data, "no test/: its val/"
    make_image_folder(data, {"test": 1})
    assert champion.held_out(data) == data / "test"
