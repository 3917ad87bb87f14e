"""FFCV backend: ``.beton`` files written by ``fdfast-convert``, decoded by FFCV's JIT-compiled pipeline.

Pipeline (the ffcv-imagenet recipe, minus normalisation, which the FD step does on the device):

* train: ``RandomResizedCropRGBImageDecoder((S, S), scale=(min, max), ratio=(3/4, 4/3))`` (decode +
  crop + resize in one pass) then ``RandomHorizontalFlip``;
* eval: ``CenterCropRGBImageDecoder((S, S), ratio=S / eval_resize)``, i.e. the central square of
  side ``S/eval_resize * shorter side`` resized to S, the same region as resize-256 + center-crop-224;
* then ``ToTensor, ToDevice(device, non_blocking=True), ToTorchImage(channels_last=True)``: uint8
  NHWC memory seen as NCHW channels-last; labels ``IntDecoder, ToTensor, Squeeze(1), ToDevice``
  (int64). FFCV resizes with OpenCV's INTER_AREA whatever ``data.interpolation`` says.

Order and sharding. ``set_epoch(e, k)`` fixes the order from ``(seed, e)``: FFCV's RANDOM order is
``default_rng(seed + e).permutation`` on one process and ``DistributedSampler(seed).set_epoch(e)``
with ``distributed=True``; QUASI_RANDOM shuffles page tables *in place*, so its order would also depend
on the epochs iterated before — we rebuild those tables before every epoch. The first ``k`` batches are
skipped by slicing the epoch's index order before FFCV's epoch thread starts, so nothing is decoded
for them. Training uses ``distributed=(world_size > 1)`` (needs an initialised process group; every
rank gets the same number of full batches). Evaluation does not: FFCV's distributed sequential order
pads shards with *repeated* samples, which would be counted twice. Instead rank r reads samples
``r, r + world, ...`` and, where its shard is one shorter than the longest, ends with a padding entry
whose label is -1 (a black image), exactly like the torchvision backend: every rank yields
``ceil(ceil(N / world) / batch)`` batches of equal shapes, and metrics count only ``labels >= 0``.

The crop and flip draws come from numba's per-thread RNGs and are not reproducible; the order is.

Pitfalls handled here (see FFCV issues #350/#396 and the notes in the project docs):

* An exception in FFCV's epoch thread is only printed and the consumer then waits forever; our
  epoch iterator forwards it to the training loop as a ``RuntimeError``.
* ``num_workers`` above numba's thread limit raises: it is clamped to the usable cores.
* ``Loader()`` and every epoch call ``torch.set_num_threads(num_workers)``: we restore the caller's
  value.
* Batches are views into buffers FFCV reuses ``prefetch + 2`` batches later: clone what you keep.
* FFCV trusts the numbers in a file (a damaged header aborts the process): :func:`pipelines.beton.check_beton`
  checks the layout first.
"""
from __future__ import annotations

import queue
import threading
import warnings
from pathlib import Path

import numpy as np
import torch

from fdfast.config.data import DataConfig

from .base import CROP_RATIO, CountedLoader, DataError, LoaderRequest, MissingDependency, usable_cores
from .beton import check_beton

INSTALL_HINT = "install FFCV with `pip install 'fdfast[ffcv]' && pip install --no-deps ffcv==1.0.2` (it compiles: needs a C++ compiler, pkg-config, libturbojpeg and OpenCV, see the README's Install section), or in a source checkout `bash scripts/install_optional_deps.sh .venv/bin/python`"


def _import_ffcv():
    """Import what the backend needs from FFCV, or raise :class:`MissingDependency` saying how to install."""
    try:
        import ffcv.fields.decoders as decoders
        import ffcv.loader as loader_mod
        import ffcv.transforms as transforms
        from ffcv.loader.epoch_iterator import EpochIterator
        from ffcv.pipeline.compiler import Compiler
        from ffcv.traversal_order import QuasiRandom
    except (ImportError, OSError) as e:   # OSError: the compiled extension cannot find libturbojpeg
        raise MissingDependency(f"data.backend='ffcv' needs the ffcv package, which failed to import "
                                f"({type(e).__name__}: {e}); {INSTALL_HINT}") from e
    return decoders, loader_mod, transforms, EpochIterator, Compiler, QuasiRandom


class _Failed:
    """Put in FFCV's output queue by a dying epoch thread, in place of a batch."""

    def __init__(self, exc: BaseException):
        self.exc = exc


def _guarded_epoch_iterator(EpochIterator):
    from ffcv.loader.epoch_iterator import IS_CUDA

    class GuardedEpochIterator(EpochIterator):
        """FFCV's epoch thread, but an exception reaches the consumer instead of hanging it."""

        def run(self):
            try:
                super().run()
            except BaseException as exc:  # noqa: BLE001 - everything must reach the consumer
                while not self.terminate_event.is_set():
                    try:
                        self.output_queue.put(_Failed(exc), timeout=0.5)
                        return
                    except queue.Full:
                        pass

        def __next__(self):
            item = self.output_queue.get()
            if isinstance(item, _Failed):
                self.close()
                raise RuntimeError(f"FFCV's loader thread failed while preparing a batch of "
                                   f"{self.loader.fname}: {type(item.exc).__name__}: {item.exc}") from item.exc
            if item is None:
                self.close()
                raise StopIteration
            slot, result = item
            if IS_CUDA:    # as upstream: wait until the slot's host-to-device copy is done
                self.current_stream.wait_stream(self.cuda_streams[slot])
            return result

        def close(self):
            # Let the epoch thread finish its batch before FFCV releases the memory it decodes from
            # (upstream closes the memory context under a running thread when a loop breaks early).
            self.terminate_event.set()
            if self.is_alive() and threading.current_thread() is not self:
                self.join(timeout=60)
            super().close()

    return GuardedEpochIterator


def _usable_workers(requested: int) -> int:
    import numba

    cores = usable_cores()
    return max(1, min(requested if requested > 0 else cores, cores, numba.config.NUMBA_NUM_THREADS))


class FFCVLoader(CountedLoader):
    """The loader contract (``pipelines.base``) over an FFCV ``.beton`` with ``image`` and ``label`` fields."""

    skipped_images = 0    # undecodable files were left out by fdfast-convert

    def __init__(self, data: DataConfig, request: LoaderRequest):
        threads = torch.get_num_threads()    # importing ffcv already sets it to 1
        try:
            decoders, loader_mod, transforms, EpochIterator, Compiler, QuasiRandom = _import_ffcv()
        finally:
            torch.set_num_threads(threads)
        self.data, self.request = data, request
        key, path = request.key, Path(request.source(data))
        if not request.source(data):
            raise DataError(f"data.backend='ffcv' needs a .beton file in {key} "
                            "(build one with fdfast-convert IMAGE_FOLDER OUT_DIR)")
        if path.is_dir():
            raise DataError(f"{key}='{path}' is a folder; data.backend='ffcv' reads .beton files. "
                            f"Convert it with: fdfast-convert {path} OUT_DIR")
        if not path.is_file():
            raise DataError(f"{key}='{path}' does not exist; build it with fdfast-convert IMAGE_FOLDER OUT_DIR")
        if data.interpolation != "bilinear":
            warnings.warn(f"data.interpolation={data.interpolation!r} is ignored by FFCV, which resizes with "
                          "OpenCV INTER_AREA", stacklevel=2)
        distributed = request.train and request.world_size > 1
        if distributed:
            self._check_process_group(request)
            if data.ffcv_order == "quasi_random":
                raise DataError("data.ffcv_order='quasi_random' is not supported by FFCV with several "
                                "processes (world_size > 1); use data.ffcv_order='random'")
        self._QuasiRandom = QuasiRandom
        self._Compiler = Compiler
        self._EpochIterator = _guarded_epoch_iterator(EpochIterator)
        self.num_workers = _usable_workers(data.num_workers)

        S = request.img_size
        if request.train:
            image_ops = [decoders.RandomResizedCropRGBImageDecoder((S, S), scale=(data.min_scale, data.max_scale),
                                                                   ratio=CROP_RATIO),
                         transforms.RandomHorizontalFlip()]
        else:
            image_ops = [decoders.CenterCropRGBImageDecoder((S, S), ratio=S / data.eval_resize)]
        # No NormalizeImage here: the step normalises on the device (and NormalizeImage after ToDevice
        # hangs FFCV on a CPU device).
        image_ops += [transforms.ToTensor(), transforms.ToDevice(request.device, non_blocking=True),
                      transforms.ToTorchImage(channels_last=True)]
        # Squeeze(1), not Squeeze(): a batch of one must stay shape (1,)
        label_ops = [decoders.IntDecoder(), transforms.ToTensor(), transforms.Squeeze(1),
                     transforms.ToDevice(request.device, non_blocking=True)]

        labels = check_beton(path, key)    # before FFCV reads any of it
        keep = request.subset(labels)
        pool = np.arange(len(labels), dtype=np.uint64) if keep is None else np.array(keep, dtype=np.uint64)
        self._num_samples = n_total = len(pool)
        OrderOption = loader_mod.OrderOption
        if request.train:
            order = OrderOption.QUASI_RANDOM if data.ffcv_order == "quasi_random" else OrderOption.RANDOM
            indices = None if keep is None else pool
        else:
            order = OrderOption.SEQUENTIAL
            indices = pool[request.rank::request.world_size]
            if len(indices) == 0:
                raise DataError(f"{key}='{path}' has {n_total} samples, fewer than the {request.world_size} ranks")

        try:
            self._loader = loader_mod.Loader(
                str(path), batch_size=request.batch_size, num_workers=self.num_workers, os_cache=data.ffcv_os_cache,
                order=order, distributed=distributed, seed=request.seed, indices=indices,
                pipelines={"image": image_ops, "label": label_ops}, drop_last=request.train,
                batches_ahead=max(1, data.prefetch))
        finally:
            torch.set_num_threads(threads)
        if request.train:
            self._len = len(self._loader)
            if self._len == 0:
                raise request.no_full_batch(str(path), self._num_samples)
        else:
            self._count_eval_batches(self._num_samples)

    # -- helpers --------------------------------------------------------------------------------
    @staticmethod
    def _check_process_group(request: LoaderRequest) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"FFCV training with world_size={request.world_size} needs torch.distributed "
                               "initialised (init_process_group) before the loader is built")
        if (dist.get_rank(), dist.get_world_size()) != (request.rank, request.world_size):
            raise RuntimeError(f"loader request says rank {request.rank}/{request.world_size} but the process "
                               f"group says {dist.get_rank()}/{dist.get_world_size()}")

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Sample indices this rank reads in ``epoch`` (before the drop-last cut), from (seed, epoch)."""
        traversal = self._loader.traversal_order
        if isinstance(traversal, self._QuasiRandom):
            traversal.prepare_data_structures()    # undo the in-place page shuffles of earlier epochs
        return np.asarray(traversal.sample_order(epoch))

    # -- contract -------------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        """Images in the whole dataset (all ranks)."""
        return self._num_samples

    def __iter__(self):
        bs = self.request.batch_size
        epoch, start = self._begin_pass()
        order = self.epoch_order(epoch)
        if self.request.train:
            order = order[: self._len * bs]               # drop_last, equal on every rank
        order = order[start * bs:]
        emitted = start
        if len(order):
            threads = torch.get_num_threads()
            self._Compiler.set_num_threads(self.num_workers)
            it = self._EpochIterator(self._loader, order)
            try:
                for i, (images, labels) in enumerate(it):
                    if i == 0:      # the epoch thread has set torch's thread count by now
                        torch.set_num_threads(threads)
                    emitted += 1
                    yield self._finish_batch(images, labels, emitted)
            finally:
                it.close()
                torch.set_num_threads(threads)
        yield from self._padding_batches(emitted)   # eval: a rank whose shard ran out one batch early


