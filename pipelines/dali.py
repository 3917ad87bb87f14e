"""NVIDIA DALI backend: JPEG decoding on the GPU (nvJPEG / hardware decoder), or on the CPU.

The graph (:func:`fd_pipeline`) is kept apart from the iteration logic, as in DALI's ResNet-50 example:

* ``fn.readers.file`` over the ImageFolder's files, sharded with ``shard_id=rank, num_shards=world,
  pad_last_batch=True``;
* train: ``fn.decoders.image_random_crop`` (decodes only the crop window: ROI decode) with
  ``random_area=[min, max]``, ``random_aspect_ratio=[3/4, 4/3]``, then ``fn.resize`` to S x S and
  ``fn.flip(horizontal=fn.random.coin_flip())``;
* eval: ``fn.decoders.image`` -> ``fn.resize(resize_shorter=eval_resize, cubic)`` -> centred
  ``fn.crop(S, S)``, the torchvision backend's resize + center crop;
* on a GPU the decoder is ``device="mixed"`` with ``hw_decoder_load`` and memory pre-allocated for the
  largest ImageNet image (5980 x 6430), so no reallocation stalls mid-epoch; everything after it runs
  on the GPU. On a CPU device (``device_id=None``) every op runs on the CPU.

Output: uint8 NHWC batches from ``DALIGenericIterator``; ``permute(0, 3, 1, 2)`` is a zero-copy NCHW
view in channels-last memory; labels arrive as int32 (B, 1) and become int64 (B,). With DALI 2.x's
dynamic executor the iterator hands out DLPack views that keep their buffers alive, so a batch stays
valid after the next one is drawn (checked on the CPU by the tests).

Files and labels come from torchvision's ``find_classes`` / ``make_dataset`` (handed to the reader as
a ``file_list``), so class indices, file extensions and the set of files are exactly ImageFolder's.

Order, epochs and resume. DALI's own ``random_shuffle`` only draws from a 1024-sample window over a
list shuffled once with a fixed internal seed, and a DALI pipeline cannot seek. To get the contract
(order from ``(seed, epoch)`` alone, exact mid-epoch resume), a pipeline lives for one epoch: each
epoch the full file list is permuted with ``default_rng([seed, epoch])`` (train; eval keeps folder
order) and a new pipeline is built over it (~1 s for ImageNet's 1.28 M files). DALI then cuts the
list into ``world`` contiguous shards (``stick_to_shard=True``: no rotation inside a pipeline).
``set_epoch(e, k)`` removes the first ``k * batch`` entries of every shard from the list before
building: since ``world * k * batch`` entries go, DALI's shard boundaries shift exactly onto the
trimmed shards, so nothing is decoded for skipped batches. The augmentation draws are seeded from
``(seed, epoch, rank)``: a given run is reproducible, but a resumed epoch draws fresh crops.

Equal steps. Train uses ``LastBatchPolicy.DROP``: ``(N // world) // batch`` batches on every rank.
Eval uses ``PARTIAL`` with ``pad_last_batch=True``: the iterator trims DALI's padding duplicates, so a
rank whose shard is shorter ends with a shorter (possibly empty) batch; we then append black images
labelled -1, as the torchvision backend does, so every rank yields ``ceil(ceil(N / world) / batch)``
batches of equal shapes and metrics that count ``labels >= 0`` see every image exactly once.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from .base import CROP_RATIO, CountedLoader, LoaderSpec, MissingDependency, check_center_crop_backend

INSTALL_HINT = "install DALI with `pip install 'fdfast[dali]'` (nvidia-dali-cuda120), or in a source checkout `bash scripts/install_optional_deps.sh .venv/bin/python`"

# nvJPEG buffers sized for the largest ImageNet image, and DALI's ResNet-50 example paddings.
PREALLOCATE_WIDTH_HINT = 5980
PREALLOCATE_HEIGHT_HINT = 6430
DEVICE_MEMORY_PADDING = 211025920
HOST_MEMORY_PADDING = 140544512


def _import_dali():
    try:
        from nvidia.dali import pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    except (ImportError, OSError) as e:
        raise MissingDependency(f"data.backend='dali' needs NVIDIA DALI, which failed to import "
                                f"({type(e).__name__}: {e}); {INSTALL_HINT}") from e
    return pipeline_def, types, DALIGenericIterator, LastBatchPolicy


def fd_pipeline(*, file_root: str, file_list: str, shard_id: int, num_shards: int, train: bool, img_size: int,
                min_scale: float, max_scale: float, eval_resize: int, interpolation: str, gpu: bool,
                hw_decoder_load: float):
    """The DALI graph; wrap with ``pipeline_def`` (done by :class:`DALILoader`)."""
    from nvidia.dali import fn, types

    jpegs, labels = fn.readers.file(
        file_root=file_root, file_list=file_list, shard_id=shard_id, num_shards=num_shards,
        pad_last_batch=True, random_shuffle=False, stick_to_shard=True, name="Reader")
    if gpu:
        decode = dict(device="mixed", hw_decoder_load=hw_decoder_load,
                      device_memory_padding=DEVICE_MEMORY_PADDING, host_memory_padding=HOST_MEMORY_PADDING,
                      preallocate_width_hint=PREALLOCATE_WIDTH_HINT, preallocate_height_hint=PREALLOCATE_HEIGHT_HINT)
    else:
        decode = dict(device="cpu")
    S = img_size
    if train:
        images = fn.decoders.image_random_crop(
            jpegs, output_type=types.RGB, random_area=[min_scale, max_scale],
            random_aspect_ratio=list(CROP_RATIO), num_attempts=10, **decode)
        interp = types.INTERP_CUBIC if interpolation == "bicubic" else types.INTERP_LINEAR
        images = fn.resize(images, resize_x=S, resize_y=S, interp_type=interp, antialias=True)
        images = fn.flip(images, horizontal=fn.random.coin_flip(probability=0.5))
    else:
        images = fn.decoders.image(jpegs, output_type=types.RGB, **decode)
        images = fn.resize(images, resize_shorter=eval_resize, interp_type=types.INTERP_CUBIC, antialias=True)
        images = fn.crop(images, crop=(S, S))      # crop_pos_x = crop_pos_y = 0.5: centred
    if gpu:
        labels = labels.gpu()
    return images, labels


def list_image_folder(root: str | os.PathLike) -> tuple[list[str], list[tuple[str, int]]]:
    """``(classes, [(path, label)])`` exactly as ``torchvision.datasets.ImageFolder`` finds them."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder '{root}' does not exist (data.train / data.val); "
                                "data.backend='dali' reads ImageFolders: ROOT/<class>/<image>")
    try:
        classes, class_to_idx = find_classes(root)
    except FileNotFoundError:
        raise ValueError(f"'{root}' has no class sub-folders; data.backend='dali' reads ImageFolders "
                         "(ROOT/<class>/<image>)") from None
    samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    if not samples:
        raise ValueError(f"image folder '{root}' holds no images")
    return classes, samples


def _unreadable(paths: list[str]) -> list[tuple[str, str]]:
    """The files among ``paths`` that PIL cannot decode either, with the reason."""
    from PIL import Image

    bad = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im.load()
        except Exception as e:  # noqa: BLE001 - any failure: report this file
            bad.append((p, f"{type(e).__name__}: {e}"))
    return bad


class DALILoader(CountedLoader):
    """The loader contract (``pipelines.base``) over an ImageFolder, decoded by DALI."""

    def __init__(self, spec: LoaderSpec):
        pipeline_def, _, self._Iterator, self._Policy = _import_dali()
        check_center_crop_backend(spec, "dali")
        if not 0 <= spec.rank < spec.world_size:
            raise ValueError(f"rank {spec.rank} is outside world_size {spec.world_size}")
        self.spec = spec
        self.root = Path(spec.path)
        self.classes, samples = list_image_folder(self.root)
        bad = [p for p, _ in samples if "\n" in p]
        if bad:
            raise ValueError(f"file name with a line break cannot be handed to DALI: {bad[0]!r}; rename it")
        root = str(self.root)
        self._rel_paths = np.array([os.path.relpath(p, root) for p, _ in samples], dtype=object)
        self._labels = np.array([y for _, y in samples], dtype=np.int64)
        self._pipeline_fn = pipeline_def(fd_pipeline)

        self.gpu = spec.device.type == "cuda"
        if self.gpu:
            self.device_id = spec.device.index if spec.device.index is not None else torch.cuda.current_device()
        else:
            self.device_id = None     # DALI's CPU-only mode
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.num_threads = max(1, min(spec.num_workers if spec.num_workers > 0 else cores, cores))

        n, w, bs = len(samples), spec.world_size, spec.batch_size
        if spec.train:
            self._len = (n // w) // bs
            if self._len == 0:
                raise ValueError(f"'{self.root}': {n} images give no full batch of {bs} per rank on {w} "
                                 "rank(s); lower train.batch_size")
        else:
            if n < w:
                raise ValueError(f"'{self.root}' has {n} images, fewer than world_size={w}")
            self._count_eval_batches(n)

    # -- contract -------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        """Images in the whole dataset (all ranks)."""
        return len(self._labels)

    def __iter__(self):
        spec, bs = self.spec, self.spec.batch_size
        epoch, start = self._begin_pass()
        # Trimming the shards works for training (every shard holds >= len * batch samples); eval
        # resumes, which are rare and cheap, skip by iterating.
        trim = start if spec.train else 0
        skip = start - trim
        order = self.epoch_order(epoch, skip_per_shard=trim * bs)
        shard = self._shard_of(order, spec.rank)
        emitted = start
        if emitted < self._len and len(shard):
            pipe, it = self._build(order, epoch)
            try:
                consumed = 0
                while emitted < self._len:
                    try:
                        out = next(it)[0]
                    except StopIteration:
                        break
                    except RuntimeError as e:
                        raise self._explain(e, shard, consumed) from e
                    consumed += 1
                    if skip:
                        skip -= 1
                        continue
                    images = out["images"].permute(0, 3, 1, 2)      # NHWC memory = channels-last NCHW
                    labels = out["labels"].squeeze(-1).long()
                    emitted += 1
                    yield self._finish_batch(images, labels, emitted)
            finally:
                del it, pipe      # free the decoder's pre-allocated buffers before the next epoch builds
        if spec.train and emitted < self._len:
            raise RuntimeError(f"DALI produced {emitted} of {self._len} batches on rank {spec.rank}")
        yield from self._padding_batches(emitted)   # eval: this rank's shard is empty for the last batches

    # -- internals ------------------------------------------------------------------------------
    def epoch_order(self, epoch: int, skip_per_shard: int = 0) -> np.ndarray:
        """Indices (into the folder's sorted sample list) in the order DALI reads them this epoch,
        all shards concatenated, with the first ``skip_per_shard`` entries of every shard removed."""
        n, w = len(self._labels), self.spec.world_size
        order = (np.random.default_rng([self.spec.seed, epoch]).permutation(n) if self.spec.train
                 else np.arange(n))
        if skip_per_shard:
            bounds = [n * r // w for r in range(w + 1)]      # DALI's shard boundaries
            order = np.concatenate([order[bounds[r] + skip_per_shard:bounds[r + 1]] for r in range(w)])
        return order

    def _shard_of(self, order: np.ndarray, rank: int) -> np.ndarray:
        n, w = len(order), self.spec.world_size
        return order[n * rank // w:n * (rank + 1) // w]

    def _build(self, order: np.ndarray, epoch: int):
        spec = self.spec
        seed = int(np.random.SeedSequence([spec.seed, epoch, spec.rank]).generate_state(1)[0] % (2**31 - 1))
        with tempfile.NamedTemporaryFile("w", prefix="fdfast-dali-", suffix=".txt", delete=False) as f:
            f.writelines(f"{p} {y}\n" for p, y in zip(self._rel_paths[order], self._labels[order]))
        try:
            pipe = self._pipeline_fn(
                file_root=str(self.root), file_list=f.name, shard_id=spec.rank, num_shards=spec.world_size,
                train=spec.train, img_size=spec.img_size, min_scale=spec.min_scale, max_scale=spec.max_scale,
                eval_resize=spec.eval_resize, interpolation=spec.interpolation, gpu=self.gpu,
                hw_decoder_load=spec.dali_hw_decoder_load,
                batch_size=spec.batch_size, num_threads=self.num_threads, device_id=self.device_id, seed=seed,
                prefetch_queue_depth=max(1, spec.prefetch))
            pipe.build()                               # the reader has read the list by now
        finally:
            os.unlink(f.name)
        policy = self._Policy.DROP if spec.train else self._Policy.PARTIAL
        try:
            it = self._Iterator([pipe], ["images", "labels"], reader_name="Reader", last_batch_policy=policy,
                                auto_reset=False)
        except RuntimeError as e:                      # the constructor already runs the first batch
            raise self._explain(e, self._shard_of(order, spec.rank), 0) from e
        return pipe, it

    def _explain(self, error: RuntimeError, shard: np.ndarray, consumed: int) -> RuntimeError:
        """DALI's decode errors do not name the file: look for it among the batches in flight."""
        bs = self.spec.batch_size
        lo, hi = consumed * bs, (consumed + max(1, self.spec.prefetch) + 2) * bs
        paths = [str(self.root / p) for p in self._rel_paths[shard[lo:hi]]]
        bad = _unreadable(paths)
        if bad:
            listing = "; ".join(f"'{p}' ({why})" for p, why in bad)
            return RuntimeError(f"DALI failed on an image of '{self.root}'; unreadable: {listing}. Remove or "
                                "replace it (fdfast-convert lists every unreadable file of a folder)")
        return RuntimeError(f"DALI failed while reading '{self.root}': {str(error).strip().splitlines()[-1]}")


