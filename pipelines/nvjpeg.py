"""GPU JPEG decode with nvJPEG (``torchvision.io.decode_jpeg(list, device='cuda')``) and device-side
augmentation. The backend for machines where DALI cannot be installed (it needs only torchvision).

Pipeline per batch:

1. a thread pool reads the files' bytes (``num_workers`` threads, ``prefetch`` batches ahead);
2. one producer thread (of the main process: nvJPEG must not run in forked DataLoader workers)
   decodes the batch's JPEGs in a single batched nvJPEG call on its own CUDA stream, so decoding
   overlaps the training step running on the main stream;
3. on the same stream, per image: RandomResizedCrop (torchvision's ``get_params`` drawn from the
   per-sample generator of :mod:`pipelines.torchvision`, so both backends crop the *same* boxes) +
   antialiased resize + flip for training, or resize-shorter-side (bicubic) + center crop for
   evaluation, written into one uint8 (B, S, S, 3) buffer = channels-last (B, 3, S, S);
4. the consumer waits on the batch's CUDA event (no host sync) and gets the tensors.

Files nvJPEG cannot decode (PNG and other formats, CMYK/YCCK JPEGs, lossless/arithmetic-coded JPEGs)
are decoded on the CPU with PIL ``convert('RGB')`` exactly like the reference backend; grayscale
JPEGs are decoded to 3 channels. Sharding, ``len``, ``set_epoch`` and eval padding (``label = -1``)
come from :mod:`pipelines.torchvision`'s sampler, imported, not copied. A file neither decoder accepts is
handled as ``data.on_bad_image`` says (:class:`pipelines.base.BadImages`); its replacement in training
(the next readable file in folder order) is decoded on the CPU.

On a CPU device the same code runs with CPU decoding (libjpeg-turbo); that is how the tests run it.
"""
from __future__ import annotations

import io
import math
import queue
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from fdfast.config.data import DataConfig

from .base import CROP_RATIO, LoaderRequest, batches_in_flight
from .folder import next_readable, why_undecodable
from .torchvision import _ShardedFolderLoader

_END = object()
# Start-of-frame markers nvJPEG decodes: baseline, extended sequential, progressive (Huffman).
_NVJPEG_SOF = (0xC0, 0xC1, 0xC2)


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def jpeg_header(buf) -> Optional[tuple[int, int, int, int]]:
    """``(sof_marker, height, width, components)`` of a JPEG byte buffer, ``None`` if not a JPEG.

    Walks the marker segments up to the start-of-frame (a few iterations: SOI, APPn, DQT, SOF).
    Returns ``(0, 0, 0, 0)`` for a JPEG whose frame header cannot be found (truncated files)."""
    n = len(buf)
    if n < 4 or buf[0] != 0xFF or buf[1] != 0xD8:
        return None
    i = 2
    while i + 9 < n:
        if buf[i] != 0xFF:
            i += 1
            continue
        marker = buf[i + 1]
        if marker == 0xFF or marker == 0x01 or 0xD0 <= marker <= 0xD8:  # fill byte / standalone markers
            i += 2 if marker != 0xFF else 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h = (buf[i + 5] << 8) | buf[i + 6]
            w = (buf[i + 7] << 8) | buf[i + 8]
            return marker, h, w, buf[i + 9]
        if marker in (0xDA, 0xD9):  # start of scan / end of image before any frame header
            break
        i += 2 + ((buf[i + 2] << 8) | buf[i + 3])
    return (0, 0, 0, 0)


def _read(path: str) -> bytearray:
    # bytearray: writable, so torch.frombuffer wraps it without a copy or a warning
    with open(path, "rb") as f:
        f.seek(0, 2)
        size = f.tell()
        f.seek(0)
        buf = bytearray(size)
        f.readinto(buf)
    return buf


def _pil_decode(buf: bytearray) -> torch.Tensor:
    img = Image.open(io.BytesIO(bytes(buf))).convert("RGB")
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def _pil_decode_file(path: str) -> torch.Tensor:
    return _pil_decode(_read(path))


def rrc_params(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
               generator: torch.Generator) -> tuple[int, int, int, int]:
    """``torchvision.transforms.RandomResizedCrop.get_params`` drawing from ``generator``: the same
    draws, in the same order, as the reference backend makes from the global RNG seeded alike."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, size=(1,), generator=generator).item()
            j = torch.randint(0, width - w + 1, size=(1,), generator=generator).item()
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def train_params(height: int, width: int, sample_seed: int, scale: tuple[float, float]
                 ) -> tuple[int, int, int, int, bool]:
    """Crop box and flip of one training sample: RandomResizedCrop then RandomHorizontalFlip(0.5),
    drawn from a generator seeded with the sample's seed (reference: ``torch.manual_seed(seed)``)."""
    g = torch.Generator().manual_seed(sample_seed)
    i, j, h, w = rrc_params(height, width, scale, CROP_RATIO, g)
    flip = bool(torch.rand(1, generator=g) < 0.5)
    return i, j, h, w, flip


def eval_geometry(height: int, width: int, resize: int, size: int) -> tuple[int, int, int, int]:
    """``Resize(resize)`` (shorter side; torchvision's int truncation) + ``CenterCrop(size)`` offsets:
    returns (resized_h, resized_w, top, left)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = resize, int(resize * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return new_h, new_w, top, left


def _to_uint8_(x: torch.Tensor) -> torch.Tensor:
    # resampling overshoots (bicubic) and lands between levels; PIL rounds to nearest and clips
    return x.round_().clamp_(0, 255)


class NvJPEGLoader(_ShardedFolderLoader):
    check_pixels = True   # nvJPEG decodes whatever a header says: the listing holds it to the pixel limit first

    def __init__(self, data: DataConfig, request: LoaderRequest):
        dev = request.device
        if dev.type == "cuda" and dev.index is None:  # the producer thread needs an explicit index
            dev = torch.device("cuda", torch.cuda.current_device())
        self.device = dev
        super().__init__(data, request)  # the folder and its sampler: order, shards, seeds, eval padding
        self.num_threads = max(1, data.num_workers)
        self.prefetch = max(1, data.prefetch)
        self.stats = {"decode_jpeg": 0, "pil_fallback": 0}  # images per decoder (nvJPEG on CUDA)

    # -- loader contract (len, set_epoch, num_samples, classes: _ShardedFolderLoader) --------------
    def __iter__(self):
        items = list(self.sampler)  # (index, sample_seed); honours start_batch
        self.sampler.start = 0
        bs = self.request.batch_size
        batches = [items[k:k + bs] for k in range(0, len(items), bs)]
        if self.request.train:
            batches = [b for b in batches if len(b) == bs]
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        worker = threading.Thread(target=self._produce, args=(batches, q, stop), daemon=True,
                                  name="nvjpeg-producer")
        worker.start()
        cuda = self.device.type == "cuda"
        try:
            while True:
                obj = q.get()
                if obj is _END:
                    return
                if isinstance(obj, _Failure):
                    raise obj.exc
                images, labels, event = obj
                if cuda:
                    # order the consumer's stream after the producer's work, and tell the caching
                    # allocator these blocks are now in use on the consumer's stream too
                    cur = torch.cuda.current_stream(self.device)
                    cur.wait_event(event)
                    images.record_stream(cur)
                    labels.record_stream(cur)
                yield images, labels
        finally:
            stop.set()
            while worker.is_alive():
                try:  # unblock a producer waiting on a full queue
                    q.get_nowait()
                except queue.Empty:
                    pass
                worker.join(timeout=0.05)

    # -- producer ----------------------------------------------------------------------------------
    def _put(self, q: queue.Queue, obj, stop: threading.Event) -> bool:
        while not stop.is_set():
            try:
                q.put(obj, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self, batches: list, q: queue.Queue, stop: threading.Event) -> None:
        try:
            stream = None
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)  # the current device is per thread (torchrun: LOCAL_RANK)
                stream = torch.cuda.Stream(self.device)
            with ThreadPoolExecutor(self.num_threads, thread_name_prefix="nvjpeg-read") as pool:
                pending: deque = deque()  # (batch, futures of its file reads), in order
                todo = iter(batches)
                in_flight = batches_in_flight(self.data)
                for position in range(len(batches)):
                    while len(pending) <= self.prefetch:
                        batch = next(todo, None)
                        if batch is None:
                            break
                        pending.append((batch, [pool.submit(_read, self.samples[idx][0]) if idx >= 0 else None
                                                for idx, _ in batch]))
                    batch, futures = pending.popleft()
                    datas = [f.result() if f is not None else None for f in futures]
                    if stop.is_set():
                        return
                    following = batches[position + 1:position + 1 + in_flight]  # where a bad file sends the error
                    if stream is not None:
                        with torch.cuda.stream(stream):
                            images, labels = self._decode_batch(batch, datas, following)
                            event = torch.cuda.Event()
                            event.record(stream)
                    else:
                        images, labels = self._decode_batch(batch, datas, following)
                        event = None
                    if not self._put(q, (images, labels, event), stop):
                        return
            self._put(q, _END, stop)
        except BaseException as e:  # surfaced in the consumer, with this traceback chained
            self._put(q, _Failure(e), stop)

    # -- decode + augment ----------------------------------------------------------------------------
    def decode(self, datas: list[Optional[bytearray]], paths: list[str]
               ) -> tuple[list[Optional[torch.Tensor]], list[tuple[str, str]]]:
        """uint8 (3, H, W) images on the loader's device, nvJPEG (batched) where it applies, and the
        ``(path, reason)`` of the files neither nvJPEG nor PIL decodes (``None`` in their place, as for
        the eval padding entries, whose data is ``None``)."""
        dev = self.device
        out: list[Optional[torch.Tensor]] = [None] * len(datas)
        fast = []
        for k, buf in enumerate(datas):
            hdr = jpeg_header(buf) if buf is not None else None
            if hdr is not None and hdr[0] in _NVJPEG_SOF and hdr[3] in (1, 3):
                fast.append(k)
        if fast:
            tensors = [torch.frombuffer(datas[k], dtype=torch.uint8) for k in fast]
            try:
                decoded = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=dev)
            except RuntimeError:
                decoded = [None] * len(fast)  # a damaged file fails the whole batch: retry one by one
                for n, t in enumerate(tensors):
                    try:
                        decoded[n] = decode_jpeg(t, mode=ImageReadMode.RGB, device=dev)
                    except RuntimeError:
                        decoded[n] = None
            for k, img in zip(fast, decoded):
                if img is not None:
                    out[k] = img.expand(3, -1, -1) if img.shape[0] == 1 else img
        self.stats["decode_jpeg"] += sum(o is not None for o in out)
        bad = []
        for k, img in enumerate(out):
            if img is None and datas[k] is not None:
                try:
                    out[k] = _pil_decode(datas[k]).to(dev, non_blocking=True)
                    self.stats["pil_fallback"] += 1
                except Exception as e:  # noqa: BLE001 - any failure: a bad file, handled by data.on_bad_image
                    bad.append((paths[k], why_undecodable(paths[k], e)))
        return out, bad

    def _decode_batch(self, batch: list[tuple[int, int]], datas: list[Optional[bytearray]], following: list):
        r, data = self.request, self.data
        dev = self.device
        indices = [idx for idx, _ in batch]
        paths = [self.samples[idx][0] if idx >= 0 else "" for idx in indices]
        labels = [self.samples[idx][1] if idx >= 0 else -1 for idx in indices]
        imgs, bad = self.decode(datas, paths)
        # error: raises, naming them and the bad files of the batches in flight after this one
        self.bad_images.handle(self.with_files_ahead(bad, [i for b in following for i, _ in b]))
        for k in range(len(batch) if bad else 0):
            if imgs[k] is not None or indices[k] < 0:
                continue
            if r.train:                              # skip: the slot takes the next readable file
                found: list[tuple[str, str]] = []
                j, img = next_readable(self.samples, indices[k] + 1, _pil_decode_file, found)
                self.bad_images.handle(found)
                imgs[k], labels[k] = img.to(dev, non_blocking=True), self.samples[j][1]
            else:                                    # skip in evaluation: padding, not counted
                labels[k] = -1
        size = r.img_size
        nhwc = torch.zeros((len(batch), size, size, 3), dtype=torch.uint8, device=dev)
        out = nhwc.permute(0, 3, 1, 2)  # channels-last (B, 3, S, S) view
        for b, (img, (_, seed)) in enumerate(zip(imgs, batch)):
            if img is None:                          # eval padding: black
                continue
            h, w = img.shape[-2:]
            if r.train:
                i, j, ch, cw, flip = train_params(h, w, seed, (data.min_scale, data.max_scale))
                x = img[:, i:i + ch, j:j + cw].unsqueeze(0).float()
                x = F.interpolate(x, size=(size, size), mode=data.interpolation, align_corners=False,
                                  antialias=True)
                if flip:
                    x = x.flip(-1)
            else:
                nh, nw, top, left = eval_geometry(h, w, data.eval_resize, size)
                x = img.unsqueeze(0).float()
                if (nh, nw) != (h, w):
                    x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
                if nh < size or nw < size:  # CenterCrop pads a too-small image with zeros, centred
                    ph, pw = max(size - nh, 0), max(size - nw, 0)
                    x = F.pad(x, (pw // 2, (pw + 1) // 2, ph // 2, (ph + 1) // 2))
                    nh, nw = x.shape[-2:]
                    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
                x = x[..., top:top + size, left:left + size]
            out[b].copy_(_to_uint8_(x[0]))
        return out, torch.tensor(labels, dtype=torch.int64).to(dev, non_blocking=True)
