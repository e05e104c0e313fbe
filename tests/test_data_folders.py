"""data/folders.py: the layout checks, each header read once, and the verified download, on local files."""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import pytest

from helpers import SHARED_DATA, compose_cfg, make_image_folder
from visiontune import VisiontuneError, data


def test_find_samples_labels_every_image(tiny_folder):
    classes, samples = data.find_samples(tiny_folder)
    assert classes == ["ants", "bees"]
    assert len(samples["train"]) == 12 and len(samples["val"]) == 8
    assert {label for _, label in samples["val"]} == {0, 1}
    assert all(Path(p).parent.name == classes[label] for p, label in samples["train"])


def test_missing_root_says_how_to_point_at_data(tmp_path):
    with pytest.raises(VisiontuneError, match="does not exist.*data.root="):
        data.prepare_root(tmp_path / "nowhere", None, None, None)


@pytest.mark.parametrize("split", ["train", "val"])
def test_missing_split(tmp_path, split):
    root = make_image_folder(tmp_path / "d", {"train": 1, "val": 1})
    shutil.rmtree(root / split)
    with pytest.raises(VisiontuneError, match=f"{split} is missing"):
        data.find_samples(root)


def test_different_class_folders(tmp_path):
    root = make_image_folder(tmp_path / "d", {"train": 1, "val": 1})
    make_image_folder(root, {"val": 1}, classes=("wasps",))
    with pytest.raises(VisiontuneError, match=r"only in val \['wasps'\]"):
        data.find_samples(root)


def test_split_without_images(tmp_path):
    root = make_image_folder(tmp_path / "d", {"train": 1, "val": 1})
    for image in (root / "val").rglob("*.jpg"):
        image.unlink()
    with pytest.raises(VisiontuneError, match="no images"):
        data.find_samples(root)


def test_corrupt_image_is_named_or_skipped(tmp_path):
    root = make_image_folder(tmp_path / "d", {"train": 2, "val": 1})
    bad = root / "train" / "ants" / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    _, samples = data.find_samples(root)
    with pytest.raises(VisiontuneError, match="broken.jpg.*skip_bad_images=true"):
        data.drop_unreadable(samples["train"], skip=False)
    kept, skipped = data.drop_unreadable(samples["train"], skip=True)
    assert skipped == 1 and len(kept) == 4 and all("broken" not in p for p, _ in kept)


def test_hidden_files_and_folders_are_not_samples(tmp_path):
    root = make_image_folder(tmp_path / "d", {"train": 1, "val": 1})
    ants = root / "train" / "ants"
    (ants / "2019" / ".ipynb_checkpoints").mkdir(parents=True)
    (ants / ".ipynb_checkpoints").mkdir()
    shutil.copy(next(ants.glob("*.jpg")), ants / ".ipynb_checkpoints" / "x.jpg")
    shutil.copy(next(ants.glob("*.jpg")), ants / "2019" / ".ipynb_checkpoints" / "z.jpg")
    shutil.copy(next(ants.glob("*.jpg")), ants / "2019" / "kept.jpg")
    (ants / "._y.jpg").write_bytes(b"\x00\x05\x16\x07 macOS AppleDouble resource fork")
    (ants / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    _, samples = data.find_samples(root)
    names = sorted(Path(path).relative_to(ants).as_posix() for path, label in samples["train"] if label == 0)
    assert names == ["2019/kept.jpg", "ants_0.jpg"]


def test_class_without_train_images_is_refused(tmp_path):
    root = make_image_folder(tmp_path / "d", {"train": 1, "val": 1})
    for image in (root / "train" / "bees").glob("*.jpg"):
        image.unlink()
    with pytest.raises(VisiontuneError, match=r"\['bees'\] in .*train have no readable images"):
        data.check_folder(root, skip_bad=False)


def test_class_without_val_images_trains_with_a_warning(tmp_path, caplog):
    root = make_image_folder(tmp_path / "d", {"train": 1, "val": 1})
    for image in (root / "val" / "bees").glob("*.jpg"):
        image.unlink()
    with caplog.at_level(logging.WARNING, logger="visiontune.data"):
        checked = data.check_folder(root, skip_bad=False)
    assert checked.classes == ["ants", "bees"] and len(checked.samples["train"]) == 2
    assert "['bees'] in" in caplog.text and "they train but are never validated" in caplog.text


def test_layout_check_needs_no_torch():
    """The CLI checks the layout before torch is imported: folders.py alone must not import it."""
    import subprocess
    import sys

    code = "import sys; from visiontune.data import folders; print(sorted({'torch', 'torchvision'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_image_extensions_are_torchvisions():
    from torchvision.datasets.folder import IMG_EXTENSIONS

    assert data.IMG_EXTENSIONS == IMG_EXTENSIONS


def test_layout_of_a_good_folder_passes(tiny_folder):
    data.check_layout(tiny_folder, downloads=False)


def test_layout_of_a_missing_root_passes_when_it_downloads(tmp_path):
    data.check_layout(tmp_path / "nowhere", downloads=True)
    with pytest.raises(VisiontuneError, match="does not exist.*data.root="):
        data.check_layout(tmp_path / "nowhere", downloads=False)


def _layout_mistake(root: Path, kind: str) -> None:
    if kind == "no val":
        shutil.rmtree(root / "val")
    elif kind == "no class folders":
        shutil.rmtree(root / "val")
        (root / "val").mkdir()
    elif kind == "no images":  # class folders, with only what is no image in them
        for image in (root / "val").rglob("*.jpg"):
            image.unlink()
        (root / "val" / "ants" / "notes.txt").write_text("not an image")


LAYOUT_MISTAKES = {
    "no val": "val is missing",
    "no class folders": "val has no class folders",
    "no images": r"val has class folders \['ants', 'bees'\] but no images in them",
}


@pytest.mark.parametrize("kind", LAYOUT_MISTAKES)
def test_layout_mistakes_are_found_without_opening_an_image(tmp_path, kind):
    root = make_image_folder(tmp_path / "d", {"train": 1, "val": 1})
    _layout_mistake(root, kind)
    with pytest.raises(VisiontuneError, match=LAYOUT_MISTAKES[kind]):
        data.check_layout(root, downloads=False)


def test_one_class_is_refused_naming_it_and_the_folder(tmp_path):
    root = make_image_folder(tmp_path / "d", {"train": 2, "val": 1}, classes=("ants",))
    message = rf"{root} holds one class, 'ants' \(in {root / 'train'}\): a classifier needs at least two"
    with pytest.raises(VisiontuneError, match=message):
        data.check_layout(root, downloads=False)
    with pytest.raises(VisiontuneError, match=message):  # a sweep's job: checked in the run
        data.find_samples(root)


def test_long_lists_in_messages_are_cut(tmp_path):
    root = tmp_path / "d"
    for split in ("train", "val"):
        for i in range(25):
            (root / split / f"c{i:02d}").mkdir(parents=True)
    with pytest.raises(VisiontuneError) as raised:
        data.check_layout(root, downloads=False)
    assert "'c00', 'c01'" in str(raised.value) and "'c09' and 15 more]" in str(raised.value)
    assert "c10" not in str(raised.value)


@pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason="the shared hymenoptera copy is not beside this checkout"
)
def test_hymenoptera_tree_checksum_matches_the_real_data():
    assert data.tree_digest(SHARED_DATA) == compose_cfg().data.tree_sha256


@pytest.fixture
def local_server(tmp_path):
    """A real HTTP server on localhost serving tmp_path/served, for the download code."""
    import functools
    import http.server
    import threading

    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join()


def _zip_folder(folder: Path, archive: Path) -> str:
    shutil.make_archive(str(archive.with_suffix("")), "zip", folder.parent, folder.name)
    return hashlib.md5(archive.read_bytes()).hexdigest()


def test_download_verifies_and_extracts_a_local_archive(tmp_path, local_server):
    served, base = local_server
    source = make_image_folder(tmp_path / "src" / "insects", {"train": 1, "val": 1})
    md5 = _zip_folder(source, served / "insects.zip")
    root = tmp_path / "data" / "my_insects"
    got = data.prepare_root(root, f"{base}/insects.zip", md5, data.tree_digest(source))
    assert got == root
    assert data.find_samples(root)[0] == ["ants", "bees"]
    assert not any(p.name.startswith(".") for p in root.parent.iterdir())


def test_download_with_wrong_checksum_keeps_nothing(tmp_path, local_server):
    served, base = local_server
    source = make_image_folder(tmp_path / "src" / "insects", {"train": 1, "val": 1})
    _zip_folder(source, served / "insects.zip")
    root = tmp_path / "data" / "insects"
    with pytest.raises(VisiontuneError, match="fail their checksum"):
        data.prepare_root(root, f"{base}/insects.zip", None, "0" * 64)
    assert not root.exists() and list((tmp_path / "data").iterdir()) == []


def test_download_with_wrong_archive_md5_is_refused(tmp_path, local_server):
    served, base = local_server
    _zip_folder(make_image_folder(tmp_path / "src" / "insects", {"train": 1, "val": 1}), served / "i.zip")
    root = tmp_path / "data" / "insects"
    with pytest.raises(VisiontuneError, match="could not download"):
        data.prepare_root(root, f"{base}/i.zip", "0" * 32, None)
    assert not root.exists()
