import math

import torch
from torchvision.transforms import functional as TF

from fdfast.objective import fd_loss, normalize, whiten
from fdfast.constants import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD


def test_fd_loss_matches_hand_computation():
    pred = torch.tensor([[[0.0, 1.0], [3.0, -0.5]]])
    target = torch.tensor([[[1.0, 1.0], [0.0, 0.5]]])
    # |d| = 1, 0, 3, 1; SmoothL1 with beta 2: 0.5 d^2 / 2 if |d| < 2 else |d| - 1
    expected = (0.25 + 0.0 + 2.0 + 0.25) / 4
    assert math.isclose(fd_loss(pred, target, beta=2.0).item(), expected, rel_tol=1e-6)


def test_fd_loss_rejects_misaligned_tokens():
    import pytest
    with pytest.raises(ValueError, match="token grid"):
        fd_loss(torch.zeros(1, 197, 8), torch.zeros(1, 196, 8))


def test_whiten_is_nonaffine_layernorm_per_token():
    x = torch.randn(3, 5, 64) * 4 + 2
    y = whiten(x, eps=1e-5)
    assert torch.allclose(y.mean(-1), torch.zeros(3, 5), atol=1e-5)
    assert torch.allclose(y.var(-1, unbiased=False), torch.ones(3, 5), atol=1e-3)
    ref = torch.nn.LayerNorm(64, elementwise_affine=False, eps=1e-5)(x)
    assert torch.allclose(y, ref, atol=1e-6)


def test_normalize_equals_totensor_normalize_and_clip_renorm():
    img = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    x = normalize(img, IMAGENET_MEAN, IMAGENET_STD)
    ref = TF.normalize(img.float() / 255, IMAGENET_MEAN, IMAGENET_STD)
    assert torch.allclose(x, ref, atol=1e-5)
    assert x.is_contiguous(memory_format=torch.channels_last)
    # the official CLIP path: ImageNet-normalised -> un-normalise -> CLIP-normalise
    std, mean = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    official = TF.normalize(ref * std + mean, CLIP_MEAN, CLIP_STD)
    assert torch.allclose(normalize(img, CLIP_MEAN, CLIP_STD), official, atol=1e-5)
