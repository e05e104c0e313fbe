"""flavor.py and the model's own code (portable.py): a model saved to a folder, loaded back as
visiontune and as MLflow's pyfunc; limits on what one request may decode; models of format 1."""

from __future__ import annotations

import base64
import io

import mlflow
import pandas as pd
import pytest
import torch
from mlflow.models import Model
from PIL import Image

from helpers import ARCHS, classifier_for, huge_png, input_size_for, like_trained, prepare_model
from visiontune import VisiontuneError, flavor


def _jpeg(size=(64, 64), colour=(200, 40, 40)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="JPEG")
    return out.getvalue()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A squeezenet saved as a run would log it, in a plain folder."""
    folder = tmp_path_factory.mktemp("model") / "model"
    flavor.save_model(str(folder), Model(), classifier_for("squeezenet"), _jpeg(), pip_requirements=["torch"])
    return folder


def test_the_saved_folder_holds_tensors_a_spec_and_its_own_loader(saved):
    assert (saved / "data" / "weights" / "weights.pt").is_file()
    assert (saved / "code" / f"{flavor.CODE_MODULE}.py").is_file()
    assert "pytorch" not in Model.load(saved).flavors  # the pickle is not written at all
    state = torch.load(saved / "data" / "weights" / "weights.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    module = mlflow.pyfunc.load_model(str(saved)).get_raw_model()  # what mlflow.pytorch users had
    assert all(torch.equal(module.state_dict()[k], v) for k, v in state.items())


def test_one_bad_value_fails_its_row_only(saved):
    model = mlflow.pyfunc.load_model(str(saved))
    good = base64.b64encode(_jpeg()).decode()
    answer = model.predict(
        pd.DataFrame({"image": [good, "not base64 !", base64.b64encode(b"GIF89a").decode()]})
    )
    assert answer["class"][0] in {"ants", "bees"} and answer["error"][0] is None
    assert "row 1" in answer["error"][1] and "not base64" in answer["error"][1]
    assert "row 2" in answer["error"][2] and "not an image" in answer["error"][2]


def test_strings_are_paths_only_where_the_loader_allows_it(saved, tmp_path):
    image = tmp_path / "a.jpg"
    image.write_bytes(_jpeg())
    refused = mlflow.pyfunc.load_model(str(saved)).predict(pd.DataFrame({"image": [str(image)]}))
    assert refused["class"][0] is None and "read_paths" in refused["error"][0]
    allowed = mlflow.pyfunc.load_model(str(saved), model_config={"read_paths": True})
    assert allowed.predict(pd.DataFrame({"image": [str(image)]}))["error"][0] is None


def test_decoded_pixels_are_bounded_per_image_and_per_request(saved, monkeypatch):
    good = base64.b64encode(_jpeg((100, 100))).decode()
    huge = base64.b64encode(huge_png()).decode()
    model = mlflow.pyfunc.load_model(str(saved))
    answer = model.predict(pd.DataFrame({"image": [huge, good]}))
    assert "row 0" in answer["error"][0] and "169,000,000 pixels" in answer["error"][0]
    assert answer["error"][1] is None

    small = mlflow.pyfunc.load_model(str(saved), model_config={"max_request_pixels": 25_000})
    answer = small.predict(pd.DataFrame({"image": [good, good, good]}))
    assert list(answer["error"].isna()) == [True, True, False]
    assert "row 2" in answer["error"][2] and "25,000 pixels together" in answer["error"][2]

    monkeypatch.setenv("VISIONTUNE_MAX_IMAGE_PIXELS", "5000")
    answer = mlflow.pyfunc.load_model(str(saved)).predict(pd.DataFrame({"image": [good]}))
    assert "over the limit of 5,000 per image" in answer["error"][0]


def test_visiontune_and_the_pyfunc_score_alike(saved):
    from visiontune import data

    images = [_jpeg((90, 64), (10, 200, 30)), _jpeg((64, 140), (90, 90, 250))]
    answer = mlflow.pyfunc.load_model(str(saved)).predict(
        pd.DataFrame({"image": images}), params={"top_k": 2}
    )
    own = flavor.load(str(saved), "")
    expected = own.probabilities(torch.stack([own.transform(data.decode(io.BytesIO(i))) for i in images]))
    for row, probabilities in enumerate(expected):
        scores, _ = torch.topk(probabilities, 2)
        assert answer["top_probabilities"][row] == pytest.approx(scores.tolist(), abs=1e-6)


@pytest.fixture(scope="module")
def pickled(tmp_path_factory):
    """A model as visiontune logged it before format 2: a pickled module, pyfunc loader visiontune.flavor."""
    classifier = classifier_for("squeezenet")
    folder = tmp_path_factory.mktemp("old") / "model"
    mlflow.pytorch.save_model(
        classifier.module,
        str(folder),
        serialization_format="pickle",
        metadata={"visiontune": classifier.metadata()},
    )
    logged = Model.load(folder)
    logged.flavors["python_function"]["loader_module"] = "visiontune.flavor"
    logged.save(str(folder / "MLmodel"))
    return folder


def test_a_pickled_model_loads_only_where_the_user_trusts_the_store(pickled, monkeypatch):
    with pytest.raises(VisiontuneError, match=flavor.TRUST_PICKLES):
        flavor.load(str(pickled), "")
    with pytest.raises(VisiontuneError, match=flavor.TRUST_PICKLES):
        mlflow.pyfunc.load_model(str(pickled))
    monkeypatch.setenv(flavor.TRUST_PICKLES, "1")
    assert flavor.load(str(pickled), "").classes == ["ants", "bees"]
    answer = mlflow.pyfunc.load_model(str(pickled)).predict(pd.DataFrame({"image": [_jpeg()]}))
    assert answer["class"][0] in {"ants", "bees"}


@pytest.mark.parametrize("mode", ["scratch", "finetune"])
@pytest.mark.parametrize("name", ARCHS)
def test_every_architecture_is_rebuilt_from_its_tensors_and_spec_alone(name, mode, standin_weights, tmp_path):
    """Builder arguments differ by mode (inception's transform_input): the rebuilt module must
    compute what the trained one did, from the files a logged model holds."""
    from visiontune import portable
    from visiontune.classifier import Classifier

    size = input_size_for(name)
    prepared = prepare_model(name, mode, standin_weights)
    module = like_trained(prepared.module, size)
    classifier = Classifier(module, ["ants", "bees"], size, name, prepared.spec.arch)
    portable.save(tmp_path, module, classifier.spec())
    rebuilt = portable.load_module(tmp_path, portable.read_spec(tmp_path))
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images), module(images))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"mean": [0.5, 0.5]}, "mean and std must be 3 numbers"),
        ({"std": [0.2, 0, 0.2]}, "std none of them 0"),
        ({"input_size": 0}, "input_size must be 1 or more"),
        ({"heads": [3]}, "heads a list of module paths"),
        ({"arch": "no_such_net"}, "cannot build 'no_such_net'"),
        ({"builder_kwargs": {"no_such_argument": 1}}, "cannot build"),
        ({"classes": ["ants", "bees", "wasps"]}, "does not fit squeezenet1_0"),
        ({"format": 1}, "format 1, this code reads format 2"),
    ],
)
def test_a_spec_that_does_not_fit_is_refused_in_one_line(saved, tmp_path, change, message):
    import json
    import shutil

    from visiontune import portable

    folder = tmp_path / "model"
    shutil.copytree(saved, folder)
    spec_file = folder / "data" / "weights" / portable.SPEC_FILE
    spec_file.write_text(json.dumps(json.loads(spec_file.read_text()) | change))
    with pytest.raises(VisiontuneError, match=message) as refused:
        flavor.load(str(folder), "")
    assert len(str(refused.value).splitlines()) == 1


def test_tta_averages_each_image_and_its_mirror(saved):
    """params={"tta": True}: each image's probabilities are the mean of the model's on the image and
    on its mirror image; visiontune's own loader and the pyfunc agree, and without it nothing changes."""
    from visiontune import data, portable

    images = [_two_halves((90, 64)), _two_halves((64, 140)), _jpeg((70, 70), (0, 0, 0))]
    pyfunc = mlflow.pyfunc.load_model(str(saved))
    own = flavor.load(str(saved), "")
    batch = torch.stack([own.transform(data.decode(io.BytesIO(i))) for i in images])
    views = own.view_probabilities(batch)
    assert views.shape == (2, 3, 2)
    plain, mirrored = own.probabilities(batch), own.probabilities(batch.flip(-1))
    assert torch.allclose(views[0], plain, atol=1e-6) and torch.allclose(views[1], mirrored, atol=1e-6)
    averaged = own.probabilities(batch, tta=True)
    assert averaged.shape == (3, 2) and torch.allclose(averaged, (plain + mirrored) / 2, atol=1e-6)
    assert not torch.allclose(averaged[:2], plain[:2], atol=1e-4)  # a mirror that differs changes the answer
    answer = pyfunc.predict(pd.DataFrame({"image": images}), params={"top_k": 2, "tta": True})
    for row, probabilities in enumerate(averaged):
        assert answer["top_probabilities"][row] == pytest.approx(
            torch.topk(probabilities, 2)[0].tolist(), abs=1e-6
        )
    assert portable.view_probabilities(own.module, own.normalize(batch), tta=False).shape == (1, 3, 2)
    assert "tta" in {p.name for p in Model.load(saved).signature.params.params}


def _two_halves(size) -> bytes:
    """A JPEG whose left half is red and right half blue: its mirror image differs."""
    image = Image.new("RGB", size, (200, 40, 40))
    image.paste((30, 40, 220), (size[0] // 2, 0, size[0], size[1]))
    out = io.BytesIO()
    image.save(out, format="JPEG")
    return out.getvalue()
