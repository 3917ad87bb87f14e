"""The reference torchvision backend and the synthetic backend against the loader contract; the errors
a user can fix, for every backend."""
import pytest
import torch

from _loader_helpers import make_loader
from fdfast.errors import UserError
from pipelines import DataError, check_batch
from pipelines.generate import make_image_folder


def loader(backend, path="", **kw):
    return make_loader(backend, path, **{"batch_size": 4, "num_workers": 0, "synthetic_size": 40,
                                         "num_classes": 5, **kw})


@pytest.mark.parametrize("backend", ["torchvision", "synthetic"])
def test_contract_and_resume_position(image_folder, backend):
    ld = loader(backend, image_folder)
    ld.set_epoch(3)
    batches = list(ld)
    assert len(batches) == len(ld) > 2
    for images, labels in batches:
        check_batch(images, labels)
        assert images.shape == (4, 3, 32, 32)
    ld.set_epoch(3, start_batch=2)
    resumed = list(ld)
    assert len(resumed) == len(batches) - 2
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(resumed, batches[2:]))
    ld.set_epoch(4)
    assert not torch.equal(next(iter(ld))[0], batches[0][0]), "a new epoch must reshuffle / redraw"
    assert ld.skipped_images == 0


def test_torchvision_labels_follow_folder_classes(tmp_path):
    root = make_image_folder(tmp_path / "imgs", num_classes=3, per_class=5, sizes=((40, 40),))
    ld = loader("torchvision", root, train=False)
    ld.set_epoch(0)
    labels = torch.cat([lab for _, lab in ld])
    assert labels.tolist()[:15] == [0] * 5 + [1] * 5 + [2] * 5
    assert ld.classes == ["class_000", "class_001", "class_002"]


def test_torchvision_sharding_disjoint_complete_equal_length(image_folder):
    n = 48  # 4 classes x 12
    world = 3
    train_idx, eval_labels = [], []
    lengths = set()
    for rank in range(world):
        tr = loader("torchvision", image_folder, batch_size=5, rank=rank, world_size=world)
        tr.set_epoch(1)
        train_idx.append({i for i, _ in tr.sampler})
        lengths.add(len(tr))
        ev = loader("torchvision", image_folder, train=False, batch_size=5, rank=rank, world_size=world)
        ev.set_epoch(0)
        batches = list(ev)
        eval_labels.append(torch.cat([lab for _, lab in batches]))
        assert len(ev) == len(batches) == 4  # ceil(ceil(48 / 3) / 5)
        padding = torch.cat([x for x, _ in batches])[eval_labels[-1] < 0]
        assert torch.all(padding == 0), "eval padding is black"
    assert len(lengths) == 1
    assert not (train_idx[0] & train_idx[1]) and not (train_idx[1] & train_idx[2])
    counts = torch.bincount(torch.cat(eval_labels)[torch.cat(eval_labels) >= 0], minlength=4)
    assert counts.tolist() == [12, 12, 12, 12], "every eval image exactly once across ranks"
    assert sum(len(x) for x in eval_labels) - n == (torch.cat(eval_labels) < 0).sum()


def test_torchvision_train_crops_are_per_sample_deterministic(image_folder):
    a = loader("torchvision", image_folder, num_workers=0)
    b = loader("torchvision", image_folder, num_workers=2)
    a.set_epoch(2)
    b.set_epoch(2)
    for (x, y), (u, v) in zip(a, b):
        assert torch.equal(x, u) and torch.equal(y, v), "augmentation must not depend on worker count"


@pytest.mark.parametrize("backend", ["torchvision", "nvjpeg", "dali"])
def test_unusable_folders_are_data_errors_naming_the_key(backend, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "no_images" / "cat").mkdir(parents=True)
    (tmp_path / "no_images" / "cat" / "notes.txt").write_text("x")
    (tmp_path / "file.jpg").write_bytes(b"x")
    cases = {"missing": "does not exist", "empty": "has no class sub-folders", "no_images": "holds no images",
             "file.jpg": "is not a folder"}
    for name, expected in cases.items():
        with pytest.raises(DataError, match=expected) as err:
            loader(backend, tmp_path / name, train=False)
        assert str(err.value).startswith(f"data.val='{tmp_path / name}'") and "\n" not in str(err.value)
    small = make_image_folder(tmp_path / "small", num_classes=2, per_class=3, sizes=((40, 40),))
    with pytest.raises(DataError, match=r"data.train=.*6 images give no full batch of 4 on each of 2 rank"):
        loader(backend, small, world_size=2)
    assert issubclass(DataError, UserError)


def test_synthetic_and_request_errors():
    with pytest.raises(DataError, match="data.synthetic_size=40 gives no full batch of 32"):
        loader("synthetic", batch_size=32, world_size=2)
    with pytest.raises(ValueError, match="rank 2 is outside world_size 2"):
        loader("synthetic", rank=2, world_size=2)


def test_demo_data_generator_refuses_a_file_in_the_way_in_one_line(tmp_path, capsys):
    from pipelines import generate

    (tmp_path / "blocker").write_text("x")
    with pytest.raises(SystemExit) as stop:
        generate.main(["--demo", str(tmp_path / "blocker")])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"python -m pipelines.generate: error: cannot create the output folder '{tmp_path / 'blocker'}/train/"
        f"class_000': '{tmp_path / 'blocker'}' is a file, not a folder; choose another output path"]
