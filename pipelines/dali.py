"""NVIDIA DALI backend: JPEG decoding on the GPU (nvJPEG / hardware decoder), or on the CPU.

The graph (:func:`fd_pipeline`) is kept apart from the iteration logic, as in DALI's ResNet-50 example:

* ``fn.readers.file`` over the ImageFolder's files, sharded with ``shard_id=rank, num_shards=world,
  pad_last_batch=True``;
* train: ``fn.decoders.image_random_crop`` (decodes only the crop window: ROI decode) with
  ``random_area=[min, max]``, ``random_aspect_ratio=[3/4, 4/3]``, then ``fn.resize`` to S x S and
  ``fn.flip(horizontal=fn.random.coin_flip())``;
* eval: ``fn.decoders.image`` -> ``fn.resize`` to the size torchvision's ``Resize(eval_resize)`` computes
  (shorter side = eval_resize, longer side truncated: ``int(eval_resize * long / short)``; bicubic) ->
  ``fn.slice`` of S x S at torchvision's ``CenterCrop`` anchors (``round((side - S) / 2)``, half to even).
  Both are computed per sample in the graph from the decoded shape: DALI's own ``resize_shorter`` rounds
  the longer side up and its centred crop anchors round the other way, which moved the crop of the
  common 500 x 375 photos by a pixel (a mean difference of 5-10 levels to torchvision's). EXIF
  orientation is ignored, as PIL (and so torchvision's ImageFolder) ignores it;
* on a GPU the decoder is ``device="mixed"`` with ``hw_decoder_load`` and memory pre-allocated for the
  largest ImageNet image (5980 x 6430), so no reallocation stalls mid-epoch; everything after it runs
  on the GPU. On a CPU device (``device_id=None``) every op runs on the CPU.

Output: uint8 NHWC batches from ``DALIGenericIterator``; ``permute(0, 3, 1, 2)`` is a zero-copy NCHW
view in channels-last memory; labels arrive as int32 (B, 1) and become int64 (B,). With DALI 2.x's
dynamic executor the iterator hands out DLPack views that keep their buffers alive, so a batch stays
valid after the next one is drawn (checked on the CPU by the tests).

Files and labels come from :func:`pipelines.folder.list_image_folder` (handed to the reader as a
``file_list``), so class indices, file extensions and the set of files are exactly ImageFolder's.

Bad images. DALI decodes in batches and its errors do not reliably name the file, so when a batch fails
the files of the batches in flight are decoded with PIL to find the culprits (:func:`pipelines.folder.
find_undecodable`). ``data.on_bad_image=error`` raises naming all of them; ``skip`` gives each culprit's
slot of the file list to the next readable file in folder order (in evaluation the slot is then blanked
and labelled -1), the rule of the other backends, and rebuilds the pipeline at the failed batch; later
epochs start with the replacements in place.

Order, epochs and resume. DALI's own ``random_shuffle`` only draws from a 1024-sample window over a
list shuffled once with a fixed internal seed, and a DALI pipeline cannot seek. To get the contract
(order from ``(seed, epoch)`` alone, exact mid-epoch resume), a pipeline lives for one epoch: each
epoch the full file list is permuted with ``default_rng([seed, epoch])`` (train; eval keeps folder
order) and a new pipeline is built over it (~1 s for ImageNet's 1.28 M files). DALI then cuts the
list into ``world`` contiguous shards (``stick_to_shard=True``: no rotation inside a pipeline).
``set_epoch(e, k)`` removes the first ``k * batch`` entries of every shard from the list before
building: since ``world * k * batch`` entries go, DALI's shard boundaries shift exactly onto the
trimmed shards, so nothing is decoded for skipped batches (evaluation, whose last shards can be a batch
shorter, trims only what every shard holds and skips the rest by iterating). The augmentation draws are seeded from
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

import numpy as np
import torch

from fdfast.config.data import DataConfig

from .base import (CROP_RATIO, BadImages, CountedLoader, DataError, LoaderRequest, MissingDependency,
                   batches_in_flight, usable_cores)
from .folder import decode_fully, find_undecodable, list_image_folder, next_readable

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


def _center_crop_anchor(excess):
    """torchvision's ``CenterCrop`` anchor ``int(round(excess / 2.0))`` (Python rounds half to even) in
    integer graph arithmetic: ``half + (excess odd) * (half odd)``."""
    half = excess // 2
    return half + (excess - 2 * half) * (half - 2 * (half // 2))


def fd_pipeline(*, file_root: str, file_list: str, shard_id: int, num_shards: int, train: bool, img_size: int,
                min_scale: float, max_scale: float, eval_resize: int, interpolation: str, gpu: bool,
                hw_decoder_load: float):
    """The DALI graph; wrap with ``pipeline_def`` (done by :class:`DALILoader`)."""
    from nvidia.dali import fn, math, types

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
            jpegs, output_type=types.RGB, random_area=[min_scale, max_scale], adjust_orientation=False,
            random_aspect_ratio=list(CROP_RATIO), num_attempts=10, **decode)
        interp = types.INTERP_CUBIC if interpolation == "bicubic" else types.INTERP_LINEAR
        images = fn.resize(images, resize_x=S, resize_y=S, interp_type=interp, antialias=True)
        images = fn.flip(images, horizontal=fn.random.coin_flip(probability=0.5))
    else:
        images = fn.decoders.image(jpegs, output_type=types.RGB, adjust_orientation=False, **decode)
        shape = images.shape()                          # on the CPU, also for GPU images
        height, width = shape[0], shape[1]
        short = math.min(height, width)
        height, width = height * eval_resize // short, width * eval_resize // short
        images = fn.resize(images, resize_y=fn.cast(height, dtype=types.FLOAT),
                           resize_x=fn.cast(width, dtype=types.FLOAT), interp_type=types.INTERP_CUBIC, antialias=True)
        anchor = fn.stack(_center_crop_anchor(height - S), _center_crop_anchor(width - S))
        images = fn.slice(images, start=fn.cast(anchor, dtype=types.INT32), shape=[S, S], axis_names="HW")
    if gpu:
        labels = labels.gpu()
    return images, labels


class _DecodeFailure(Exception):
    def __init__(self, error: RuntimeError, bad: list[tuple[int, str]]):
        super().__init__(str(error))
        self.error, self.bad = error, bad       # bad: (sample index, reason) of the culprits found


class DALILoader(CountedLoader):
    """The loader contract (``pipelines.base``) over an ImageFolder, decoded by DALI."""

    def __init__(self, data: DataConfig, request: LoaderRequest):
        pipeline_def, _, self._Iterator, self._Policy = _import_dali()
        self.data, self.request = data, request
        path = request.source(data)
        # DALI decodes whatever a header says: the listing holds every image to the pixel limit first
        listing = list_image_folder(path, request.key, check_pixels=True)
        self.root, self.classes, self.samples = listing.root, listing.classes, listing.samples
        keep = request.subset([y for _, y in self.samples])
        if keep is not None:
            self.samples = [self.samples[i] for i in keep]
        self.bad_images = BadImages(data.on_bad_image, path, request.key)
        self.bad_images.handle(listing.bad)     # left out of the file list: DALI never opens them
        broken = [p for p, _ in self.samples if "\n" in p]
        if broken:
            raise DataError(f"file name with a line break cannot be handed to DALI: {broken[0]!r}; rename it")
        root = str(self.root)
        self._rel_paths = np.array([os.path.relpath(p, root) for p, _ in self.samples], dtype=object)
        self._labels = np.array([y for _, y in self.samples], dtype=np.int64)
        n = len(self.samples)
        self._source = np.arange(n)               # the file read in each sample's slot (data.on_bad_image=skip)
        self._bad = np.zeros(n, dtype=bool)
        self._pipeline_fn = pipeline_def(fd_pipeline)

        self.gpu = request.device.type == "cuda"
        if self.gpu:
            index = request.device.index
            self.device_id = index if index is not None else torch.cuda.current_device()
        else:
            self.device_id = None     # DALI's CPU-only mode
        cores = usable_cores()
        self.num_threads = max(1, min(data.num_workers if data.num_workers > 0 else cores, cores))

        w, bs = request.world_size, request.batch_size
        if request.train:
            self._len = (n // w) // bs
            if self._len == 0:
                raise request.no_full_batch(path, n)
        else:
            if n < w:
                raise DataError(f"{request.key}='{path}' has {n} images, fewer than the {w} ranks")
            self._count_eval_batches(n)

    # -- contract -------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        """Images in the whole dataset (all ranks)."""
        return len(self.samples)

    @property
    def skipped_images(self) -> int:
        return self.bad_images.count

    def __iter__(self):
        epoch, start = self._begin_pass()
        emitted = start
        while True:
            try:
                for images, labels in self._batches(epoch, emitted):
                    emitted += 1
                    yield self._finish_batch(images, labels, emitted)
                break
            except _DecodeFailure as failure:
                self._skip(failure)     # data.on_bad_image=error raises; skip resumes at the failed batch
        if self.request.train and emitted < self._len:
            raise RuntimeError(f"DALI produced {emitted} of {self._len} batches on rank {self.request.rank}")
        yield from self._padding_batches(emitted)   # eval: this rank's shard is empty for the last batches

    # -- internals ------------------------------------------------------------------------------
    def epoch_order(self, epoch: int, skip_per_shard: int = 0) -> np.ndarray:
        """Indices (into the folder's sorted sample list) in the order DALI reads them this epoch,
        all shards concatenated, with the first ``skip_per_shard`` entries of every shard removed."""
        n, w = len(self._labels), self.request.world_size
        order = (np.random.default_rng([self.request.seed, epoch]).permutation(n) if self.request.train
                 else np.arange(n))
        if skip_per_shard:
            bounds = [n * r // w for r in range(w + 1)]      # DALI's shard boundaries
            order = np.concatenate([order[bounds[r] + skip_per_shard:bounds[r + 1]] for r in range(w)])
        return order

    def _shard_of(self, order: np.ndarray, rank: int) -> np.ndarray:
        n, w = len(order), self.request.world_size
        return order[n * rank // w:n * (rank + 1) // w]

    def _batches(self, epoch: int, first: int):
        """Batches ``first, first + 1, ...`` of this rank's shard, from a pipeline built for them.

        The shards are trimmed by the batches that every shard holds in full (so nothing is decoded for
        them: DALI's shard boundaries move exactly onto the trimmed shards); only evaluation, whose last
        shards can be a batch shorter, skips the rest by iterating."""
        r, bs, n = self.request, self.request.batch_size, len(self.samples)
        trim = min(first, (n // r.world_size) // bs)
        skip = first - trim
        order = self.epoch_order(epoch, skip_per_shard=trim * bs)
        shard = self._shard_of(order, r.rank)
        if len(shard) <= skip * bs:
            return
        pipe, it = self._build(order, epoch)
        try:
            consumed = 0
            while True:
                try:
                    out = next(it)[0]
                except StopIteration:
                    return
                except RuntimeError as e:
                    raise self._explain(e, shard, consumed) from e
                consumed += 1
                if consumed <= skip:
                    continue
                images = out["images"].permute(0, 3, 1, 2)      # NHWC memory = channels-last NCHW
                labels = out["labels"].squeeze(-1).long()
                blank = self._bad[shard[(consumed - 1) * bs:consumed * bs]]
                if not r.train and blank.any():                 # a skipped image is not evaluated
                    drop = torch.from_numpy(blank).to(labels.device)
                    images = images.masked_fill(drop.view(-1, 1, 1, 1), 0).contiguous(memory_format=torch.channels_last)
                    labels = labels.masked_fill(drop, -1)
                yield images, labels
        finally:
            del it, pipe      # free the decoder's pre-allocated buffers before the next pipeline builds

    def _build(self, order: np.ndarray, epoch: int):
        r, data = self.request, self.data
        seed = int(np.random.SeedSequence([r.seed, epoch, r.rank]).generate_state(1)[0] % (2**31 - 1))
        read = self._source[order]
        with tempfile.NamedTemporaryFile("w", prefix="fdfast-dali-", suffix=".txt", delete=False) as f:
            f.writelines(f"{p} {y}\n" for p, y in zip(self._rel_paths[read], self._labels[read]))
        try:
            pipe = self._pipeline_fn(
                file_root=str(self.root), file_list=f.name, shard_id=r.rank, num_shards=r.world_size,
                train=r.train, img_size=r.img_size, min_scale=data.min_scale, max_scale=data.max_scale,
                eval_resize=data.eval_resize, interpolation=data.interpolation, gpu=self.gpu,
                hw_decoder_load=data.dali_hw_decoder_load,
                batch_size=r.batch_size, num_threads=self.num_threads, device_id=self.device_id, seed=seed,
                prefetch_queue_depth=max(1, data.prefetch))
            pipe.build()                               # the reader has read the list by now
        finally:
            os.unlink(f.name)
        policy = self._Policy.DROP if r.train else self._Policy.PARTIAL
        try:
            it = self._Iterator([pipe], ["images", "labels"], reader_name="Reader", last_batch_policy=policy,
                                auto_reset=False)
        except RuntimeError as e:                      # the constructor already runs the first batch
            raise self._explain(e, self._shard_of(order, r.rank), 0) from e
        return pipe, it

    def _explain(self, error: RuntimeError, shard: np.ndarray, consumed: int) -> Exception:
        """DALI's decode errors do not reliably name the file: look for it among the batches in flight."""
        bs = self.request.batch_size
        in_flight = shard[consumed * bs:(consumed + batches_in_flight(self.data)) * bs]
        read = {self.samples[i][0]: i for i in self._source[in_flight]}
        bad = [(read[p], why) for p, why in find_undecodable(list(read))]
        if bad:
            return _DecodeFailure(error, bad)
        return RuntimeError(f"DALI failed while reading '{self.root}': {str(error).strip().splitlines()[-1]}")

    def _skip(self, failure: _DecodeFailure) -> None:
        """Apply data.on_bad_image to the culprits: raise (error), or give each one's slot to the next
        readable file in folder order (skip), recording the files found bad on the way."""
        self.bad_images.handle([(self.samples[i][0], why) for i, why in failure.bad])
        for i, _ in failure.bad:
            found: list[tuple[str, str]] = []
            j, _ = next_readable(self.samples, i + 1, decode_fully, found)
            self.bad_images.handle(found)
            for k in range(len(found) + 1):     # i and the bad files between i and j all read j
                slot = (i + k) % len(self.samples)
                self._source[slot], self._bad[slot] = j, True
