"""``data`` (what the loader reads and how it crops) and ``augment`` (on-device batch augmentation)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from ..errors import ConfigError
from .checks import need

# Loader backends that run timm RandAugment per image (PIL in DataLoader workers). FFCV's numba
# pipeline, DALI's graph, nvJPEG and synthetic batches have none.
AUTO_AUGMENT_BACKENDS = ("torchvision",)
# Classes of the synthetic backend's labels when neither data.num_classes nor model.student.num_classes says.
SYNTHETIC_CLASSES = 1000


def official_eval_resize(img_size: int) -> int:
    """The official evaluation's resize at any input size, ``int(256 / 224 * img_size)``
    (``data_finetune.py``): 256 at 224, 219 at 192, 438 at 384."""
    return int((256 / 224) * img_size)


@dataclass(kw_only=True)
class DataConfig:
    backend: Literal["synthetic", "torchvision", "ffcv", "dali", "nvjpeg"] = "synthetic"
    """Loader backend. All yield uint8 channels-last images on the device and int64 labels."""
    train: str = ""
    """Training set: ImageFolder directory (torchvision, dali, nvjpeg) or .beton file (ffcv)."""
    val: str = ""
    """Validation set, same kinds as `train`; empty = no evaluation."""
    knn_train: str = ""
    """Labelled images whose features the k-NN monitor (train.knn_every) searches, same kinds as `train`."""
    knn_train_per_class: int = 0
    """At most this many images per class of knn_train (evenly spread over each class's files); 0 = all."""
    num_classes: Optional[int] = None
    """Number of classes (fine-tune head, synthetic labels); null = read from data.train (its class folders,
    or the labels of its .beton) when a fine-tune / probe starts; synthetic: model.student.num_classes, else
    1000. model.student.num_classes 0 follows it."""
    synthetic_size: int = 4096
    """Images per epoch of the synthetic backend."""
    min_scale: float = 0.08
    """RandomResizedCrop lower scale bound."""
    max_scale: float = 1.0
    """RandomResizedCrop upper scale bound."""
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    """Training crop interpolation (FD distillation: bilinear; fine-tuning: bicubic). FFCV always
    resizes with OpenCV's INTER_AREA and ignores it."""
    eval_resize: Optional[int] = None
    """Evaluation: resize the shorter side to this, then center-crop to model.student.img_size; it must be
    >= img_size. None = the official int(256 / 224 * img_size) (256 at 224, 219 at 192, 438 at 384)."""
    auto_augment: Optional[str] = None
    """timm RandAugment spec for fine-tuning, e.g. 'rand-m9-mstd0.5-inc1' (runs in the loader, per
    image; torchvision backend only); None = off."""
    num_workers: int = 8
    """Decoding workers / threads per process."""
    prefetch: int = 2
    """Batches prepared ahead of the step."""
    ffcv_order: Literal["random", "quasi_random"] = "random"
    """FFCV traversal order."""
    ffcv_os_cache: bool = True
    """FFCV: memory-map the .beton through the OS page cache."""
    dali_hw_decoder_load: float = 0.65
    """DALI: share of JPEG decoding sent to the hardware decoder (tune per card)."""
    on_bad_image: Literal["error", "skip"] = "error"
    """An image that cannot be decoded while loading (torchvision, nvjpeg, dali): stop with one line naming
    every bad file found (error), or leave it out, count it and log it (skip: in training its slot in the
    batch takes the next readable file, in evaluation it is not counted). `fdfast-convert --check-only`
    finds them up front; FFCV files hold only images that decoded at conversion."""

    def __post_init__(self) -> None:
        need(0 < self.min_scale <= self.max_scale <= 1.0,
             f"data.min_scale/max_scale must satisfy 0 < min <= max <= 1, got ({self.min_scale}, {self.max_scale})")
        need(self.num_classes is None or self.num_classes > 0,
             f"data.num_classes must be > 0 (or null: read from data.train), got {self.num_classes}")
        need(self.synthetic_size > 0, f"data.synthetic_size must be > 0, got {self.synthetic_size}")
        need(self.eval_resize is None or self.eval_resize > 0,
             f"data.eval_resize must be > 0 (or null for the official 256/224 ratio), got {self.eval_resize}")
        need(self.num_workers >= 0,
             f"data.num_workers must be >= 0 (0 = load in the main process), got {self.num_workers}")
        need(self.prefetch >= 1, f"data.prefetch must be >= 1, got {self.prefetch}")
        need(self.knn_train_per_class >= 0,
             f"data.knn_train_per_class must be >= 0 (0 = every image), got {self.knn_train_per_class}")
        need(0 <= self.dali_hw_decoder_load <= 1,
             f"data.dali_hw_decoder_load must be in [0, 1], got {self.dali_hw_decoder_load}")
        if self.backend != "synthetic":
            need(bool(self.train), f"data.backend={self.backend!r} needs data.train (an ImageFolder dir or "
                 ".beton file)")
        if self.backend == "ffcv":
            for key in ("train", "val", "knn_train"):
                path = getattr(self, key)
                need(not path or path.endswith(".beton"),
                     f"data.backend='ffcv' reads .beton files; data.{key}={path!r} is not one (build it with "
                     "fdfast-convert)")
        if self.auto_augment:
            self._check_auto_augment()

    def eval_resize_at(self, img_size: int) -> int:
        """The evaluation resize for ``img_size``: ``eval_resize``, or the official ratio when unset."""
        return self.eval_resize if self.eval_resize is not None else official_eval_resize(img_size)

    def _check_auto_augment(self) -> None:
        aa = self.auto_augment
        if self.backend not in AUTO_AUGMENT_BACKENDS:
            why = {
                "ffcv": "FFCV's numba-compiled pipeline has no RandAugment operation",
                "dali": "the DALI graph here has no RandAugment",
                "synthetic": "synthetic batches are random pixels generated on the device, nothing is augmented",
                "nvjpeg": "the nvJPEG path decodes and crops on the GPU without RandAugment",
            }[self.backend]
            raise ConfigError(
                f"data.auto_augment={aa!r} (RandAugment) cannot run with data.backend={self.backend!r}: {why}. "
                f"Use data.backend={' or '.join(repr(b) for b in AUTO_AUGMENT_BACKENDS)} (ImageFolder "
                "data.train), or set data.auto_augment=null to train without RandAugment (not the official "
                "fine-tune recipe).")
        if not aa.startswith("rand"):
            raise ConfigError(f"data.auto_augment={aa!r}: only timm RandAugment specs are supported, e.g. "
                              "'rand-m9-mstd0.5-inc1' (the official fine-tune setting)")
        from timm.data.auto_augment import rand_augment_transform
        try:
            rand_augment_transform(aa, {"translate_const": 100, "img_mean": (124, 116, 104)})
        except Exception as e:  # timm raises assorted errors on malformed specs
            raise ConfigError(f"data.auto_augment={aa!r} is not a valid timm RandAugment spec ({e}); "
                              "example: 'rand-m9-mstd0.5-inc1'") from None


@dataclass(kw_only=True)
class AugmentConfig:
    """On-device batch augmentation of fine-tuning, in the official order: normalise -> random erasing
    (per image) -> mixup / cutmix (per batch) -> soft-target or label-smoothed CE."""

    re_prob: float = 0.0
    """Random erasing probability (per image, pixel mode, one box)."""
    mixup: float = 0.0
    """Mixup Beta alpha (fine-tuning: 0.8)."""
    cutmix: float = 0.0
    """CutMix Beta alpha (fine-tuning: 1.0)."""
    label_smoothing: float = 0.0
    """Label smoothing (fine-tuning: 0.1)."""

    def __post_init__(self) -> None:
        need(0 <= self.re_prob <= 1, f"augment.re_prob must be in [0, 1], got {self.re_prob}")
        need(self.mixup >= 0 and self.cutmix >= 0,
             f"augment.mixup={self.mixup} / augment.cutmix={self.cutmix} are Beta alphas and must be >= 0")
        need(0 <= self.label_smoothing < 1, f"augment.label_smoothing must be in [0, 1), got {self.label_smoothing}")

    @property
    def mixing(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0
