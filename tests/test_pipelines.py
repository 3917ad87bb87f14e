"""The reference torchvision backend and the synthetic backend against the loader contract."""
import pytest
import torch

from pipelines import LoaderSpec, build_loader_from_spec, check_batch
from pipelines.generate import make_image_folder

CPU = torch.device("cpu")


def spec(path="", **kw):
    base = dict(path=str(path), train=True, batch_size=4, img_size=32, device=CPU, num_workers=0,
                synthetic_size=40, num_classes=5)
    base.update(kw)
    return LoaderSpec(**base)


@pytest.mark.parametrize("backend", ["torchvision", "synthetic"])
def test_contract_and_resume_position(image_folder, backend):
    loader = build_loader_from_spec(backend, spec(image_folder))
    loader.set_epoch(3)
    batches = list(loader)
    assert len(batches) == len(loader) > 2
    for images, labels in batches:
        check_batch(images, labels)
        assert images.shape == (4, 3, 32, 32)
    loader.set_epoch(3, start_batch=2)
    resumed = list(loader)
    assert len(resumed) == len(batches) - 2
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(resumed, batches[2:]))
    loader.set_epoch(4)
    assert not torch.equal(next(iter(loader))[0], batches[0][0]), "a new epoch must reshuffle / redraw"


def test_torchvision_labels_follow_folder_classes(tmp_path):
    root = make_image_folder(tmp_path / "imgs", num_classes=3, per_class=5, sizes=((40, 40),))
    loader = build_loader_from_spec("torchvision", spec(root, train=False, batch_size=4))
    loader.set_epoch(0)
    labels = torch.cat([lab for _, lab in loader])
    assert labels.tolist()[:15] == [0] * 5 + [1] * 5 + [2] * 5
    assert loader.classes == ["class_000", "class_001", "class_002"]


def test_torchvision_sharding_disjoint_complete_equal_length(image_folder):
    n = 48  # 4 classes x 12
    world = 3
    train_idx, eval_labels = [], []
    lengths = set()
    for rank in range(world):
        tr = build_loader_from_spec("torchvision", spec(image_folder, batch_size=5, rank=rank, world_size=world))
        tr.set_epoch(1)
        idx = [i for i, _ in tr.sampler]
        train_idx.append(set(idx))
        lengths.add(len(tr))
        ev = build_loader_from_spec("torchvision", spec(image_folder, train=False, batch_size=5, rank=rank,
                                                        world_size=world))
        ev.set_epoch(0)
        lengths_ev = len(ev)
        eval_labels.append(torch.cat([lab for _, lab in ev]))
        assert lengths_ev == 4  # ceil(ceil(48 / 3) / 5)
    assert len(lengths) == 1
    assert not (train_idx[0] & train_idx[1]) and not (train_idx[1] & train_idx[2])
    counts = torch.bincount(torch.cat(eval_labels)[torch.cat(eval_labels) >= 0], minlength=4)
    assert counts.tolist() == [12, 12, 12, 12], "every eval image exactly once across ranks"
    assert sum(len(x) for x in eval_labels) - n == (torch.cat(eval_labels) < 0).sum()


def test_torchvision_train_crops_are_per_sample_deterministic(image_folder):
    a = build_loader_from_spec("torchvision", spec(image_folder, num_workers=0))
    b = build_loader_from_spec("torchvision", spec(image_folder, num_workers=2))
    a.set_epoch(2)
    b.set_epoch(2)
    for (x, y), (u, v) in zip(a, b):
        assert torch.equal(x, u) and torch.equal(y, v), "augmentation must not depend on worker count"


def test_torchvision_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_loader_from_spec("torchvision", spec(tmp_path / "nope"))
    root = make_image_folder(tmp_path / "imgs", num_classes=1, per_class=3, sizes=((40, 40),), corrupt=1)
    loader = build_loader_from_spec("torchvision", spec(root, train=False, batch_size=4))
    loader.set_epoch(0)
    with pytest.raises(RuntimeError, match="corrupt_0.jpg"):
        list(loader)
