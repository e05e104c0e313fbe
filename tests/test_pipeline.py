"""pipeline.py in this process: what build_training picks on this CPU, the caches data.cache_mb
bounds, when a sweep job counts as started before. visiontune-train as a user runs it:
tests/e2e/test_train.py."""

from __future__ import annotations

import pytest

from helpers import make_image_folder


@pytest.mark.parametrize("mode", ["scratch", "feature_extract"])
def test_auto_precision_and_layout_on_this_cpu(mode, standin_weights):
    """On a CPU with native bf16 every mode trains in bf16, in NHWC; elsewhere float32, NCHW."""
    import torch

    from helpers import compose_cfg, prepare_model
    from visiontune import config, pipeline
    from visiontune.runtime import cpu_has_bf16

    prepared = prepare_model("squeezenet", mode, standin_weights)
    cfg = compose_cfg("model=squeezenet", f"mode={mode}")
    settings = config.read(cfg)
    runtime = pipeline.build_training(
        settings, prepared, torch.device("cpu"), 1, backbone_cache_bytes=0
    ).runtime
    bf16 = cpu_has_bf16()
    assert runtime.amp_dtype == (torch.bfloat16 if bf16 else None)
    assert runtime.channels_last == bf16
    assert prepared.module.features[0].weight.is_contiguous(memory_format=torch.channels_last) == bf16


# --- one memory budget, divided once ------------------------------------------------------------


def _tensor_bytes(value) -> int:
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, list | tuple):
        return sum(_tensor_bytes(v) for v in value)
    return 0


@pytest.mark.parametrize("cache_mb", [2, 8])
@pytest.mark.parametrize("mode", ["feature_extract", "staged"])
def test_data_cache_mb_bounds_every_cache_a_run_holds(tmp_path, standin_weights, monkeypatch, mode, cache_mb):
    """At the end of the first epoch, when a staged run holds all three (the val split's decoded
    images, the decoded training images and the frozen backbone's val outputs), their sum stays
    within data.cache_mb. At 224 px the val split replays in 3.6 MB, the training photos decode
    into 1.4 MB and squeezenet's val outputs take 4.1 MB in bf16 (8.3 in float32): a staged run
    with 8 MB once held all three, 9.1 MB."""
    import torch

    from helpers import compose_cfg
    from visiontune import config, engine, pipeline
    from visiontune.config import Job

    held: list = []

    class Measured(engine.BackboneCache):  # the real cache, remembered to be weighed
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            held.append(self)

    monkeypatch.setattr(engine, "BackboneCache", Measured)
    root = make_image_folder(tmp_path / "photos", {"train": 12, "val": 12}, size=(160, 120))
    cfg = compose_cfg(
        "model=squeezenet",
        f"mode={mode}",
        "data=imagefolder",
        f"data.root={root}",
        f"data.cache_mb={cache_mb}",
        f"model.weights={standin_weights('squeezenet1_0')}",
        "epochs=2",
        "num_workers=0",
        "device=cpu",
    )
    settings = config.read(cfg)
    job = Job(tmp_path, tmp_path, tmp_path / "x.log", {}, [], None, None, started=0.0)
    setup = pipeline.set_up(settings, job, torch.device("cpu"))

    class Weighed(Exception):
        pass

    def weigh(report, progress):  # after epoch 1, when every cache is full; no need to train on
        replay = getattr(setup.loaders["val"], "batches", None) or []
        decoded = setup.loaders["train"].loader.dataset.decoded or []
        cached = [c.cached or [] for c in held]
        raise Weighed(_tensor_bytes(replay) + _tensor_bytes(decoded) + _tensor_bytes(cached))

    with pytest.raises(Weighed) as weighed:
        engine.fit(setup.training, setup.loaders, on_epoch=weigh)
    size = weighed.value.args[0]
    assert (size > 0 or cache_mb < 8) and size <= cache_mb * 2**20, (
        f"{size / 2**20:.2f} MiB held within data.cache_mb={cache_mb}"
    )
