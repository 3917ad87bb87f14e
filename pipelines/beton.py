"""The layout check of an FFCV ``.beton`` file, before FFCV reads any of it.

FFCV trusts a file's numbers: a sample count larger than the data makes OpenCV abort the process (SIGABRT),
a ``page_size`` of 0 overflows, sample metadata of 0xFF bytes asks for terabytes, and a pointer past the end
of the memory-mapped file is a SIGBUS. :func:`check_beton` reads the file with FFCV 1.0.2's own dtypes
(``ffcv.types``, the ``RGBImageField`` / ``IntField`` metadata) and checks, against the file size, the header,
the field descriptors, the sample metadata and the allocation table, and then every sample: its image data
pointer is an allocation of that very sample, inside one page of the data region, of the size its mode and
pixels say, within the pixel limit of every backend. What is wrong is one line naming the file:
``truncated`` (the file ends early), ``corrupt header`` or ``corrupt sample metadata``.

The layout (``ffcv/writer.py``): header, field descriptors, one metadata row per sample, the data region in
pages (starting at the first page boundary after the metadata), the allocation table at the end, where the
header's ``alloc_table_ptr`` points.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import DataError
from .folder import PIXEL_LIMIT

FIELDS = {"image": "RGBImageField", "label": "IntField"}
"""The fields fdfast-convert writes, by name, and their FFCV types."""


def _name(raw: np.ndarray) -> str:
    return raw.tobytes().split(b"\0")[0].decode("ascii", "replace")


def check_beton(path: str | Path, key: str) -> np.ndarray:
    """The labels of the samples of the ``.beton`` at ``path`` (one per sample, in file order) after checking its
    layout (module docstring); a :class:`DataError` naming ``key``, the file and what is wrong otherwise."""
    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.types import (ALLOC_TABLE_TYPE, CURRENT_VERSION, TYPE_ID_HANDLER, FieldDescType, HeaderType,
                            get_handlers, get_metadata_type)
    from ffcv.writer import MAX_PAGE_SIZE, MIN_PAGE_SIZE

    path = Path(path)
    size = path.stat().st_size
    rebuild = f"rebuild it with fdfast-convert IMAGE_FOLDER {path}"

    def fail(what: str) -> DataError:
        return DataError(f"{key}='{path}' {what}; {rebuild}")

    if size < HeaderType.itemsize:
        raise fail(f"is truncated ({size} bytes, less than an FFCV header): not a .beton file?")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    version, num_fields, page = int(header["version"]), int(header["num_fields"]), int(header["page_size"])
    n, table_at = int(header["num_samples"]), int(header["alloc_table_ptr"])
    if version != CURRENT_VERSION:
        raise fail(f"has a corrupt header (format version {version}, FFCV 1.0.2 writes {CURRENT_VERSION}): not a "
                   ".beton file, or one of another FFCV version?")
    if not (MIN_PAGE_SIZE <= page < MAX_PAGE_SIZE and page & (page - 1) == 0):
        raise fail(f"has a corrupt header (page_size {page} is not a power of two from {MIN_PAGE_SIZE} to "
                   f"{MAX_PAGE_SIZE // 2})")
    fields_end = HeaderType.itemsize + num_fields * FieldDescType.itemsize
    if fields_end > size:
        raise fail(f"is truncated ({size} bytes end inside the descriptors of its {num_fields} fields)")
    descs = np.fromfile(path, dtype=FieldDescType, count=num_fields, offset=HeaderType.itemsize)
    unknown = sorted({int(t) for t in descs["type_id"] if TYPE_ID_HANDLER.get(int(t)) is None})
    if unknown:
        raise fail(f"has a corrupt header (field type ids {unknown} are none of FFCV's field types)")
    names = [_name(d["name"]) for d in descs]
    kinds = {name: TYPE_ID_HANDLER[int(t)].__name__ for name, t in zip(names, descs["type_id"])}
    missing = sorted(f for f, kind in FIELDS.items() if kinds.get(f) != kind)
    if missing:
        raise DataError(f"{key}='{path}' lacks the field(s) {missing}; fdfast expects the 'image' and 'label' "
                        f"fields written by fdfast-convert: {rebuild}")
    metadata_type = get_metadata_type(get_handlers(descs))
    data_start = fields_end + n * metadata_type.itemsize
    if n == 0:
        raise fail("holds no samples")
    if table_at > size:
        raise fail(f"is truncated ({size} bytes; its allocation table starts at byte {table_at})")
    if data_start > table_at:
        raise fail(f"has a corrupt header (num_samples {n:,} needs {data_start:,} bytes of sample metadata, but the "
                   f"data ends at byte {table_at:,})")
    if (size - table_at) % ALLOC_TABLE_TYPE.itemsize:
        raise fail(f"is truncated (its allocation table of {size - table_at} bytes ends inside an entry)")
    table = np.fromfile(path, dtype=ALLOC_TABLE_TYPE, offset=table_at)
    if len(table) < n:  # every sample has at least its image's allocation
        raise fail(f"has a corrupt header (num_samples {n:,}, but the allocation table holds {len(table):,} entries)")
    meta = np.fromfile(path, dtype=metadata_type, count=n, offset=fields_end)
    _check_allocations(table, n, page, data_start, table_at, fail)
    labels = meta[f"f{names.index('label')}"]
    _check_samples(meta[f"f{names.index('image')}"], labels, table, IMAGE_MODES, fail)
    return labels


def _check_allocations(table: np.ndarray, n: int, page: int, data_start: int, data_end: int, fail) -> None:
    """Every allocation belongs to a sample and lies inside one page of the data region."""
    ptr, size, sample = table["ptr"], table["size"], table["sample_id"]
    off_page = (ptr & np.uint64(page - 1)) + np.minimum(size, np.uint64(page))
    bad = ((sample >= np.uint64(n)) | (ptr < np.uint64(data_start)) | (size > np.uint64(page))
           | (ptr > np.uint64(data_end) - np.minimum(size, np.uint64(data_end))) | (off_page > np.uint64(page)))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise fail(f"has a corrupt allocation table ({int(bad.sum())} of {len(table)} entries point outside the "
                   f"data, e.g. sample {int(sample[i])}: {int(size[i])} bytes at byte {int(ptr[i])})")


def _check_samples(image: np.ndarray, label: np.ndarray, table: np.ndarray, modes, fail) -> None:
    """Every image's data pointer is an allocation of its own sample, of the size its mode and pixels say."""
    order = np.argsort(table["ptr"], kind="stable")
    ptrs, sizes, owners = table["ptr"][order], table["size"][order], table["sample_id"][order]
    at = np.minimum(np.searchsorted(ptrs, image["data_ptr"]), max(len(ptrs) - 1, 0))
    found = (len(ptrs) > 0) & (ptrs[at] == image["data_ptr"]) & (owners[at] == np.arange(len(image)))
    w, h = image["width"].astype(np.uint64), image["height"].astype(np.uint64)
    raw, jpg = image["mode"] == modes["raw"], image["mode"] == modes["jpg"]
    size_ok = np.where(raw, sizes[at] == w * h * np.uint64(3), sizes[at] > 0)
    bad = ~found | ~(raw | jpg) | (w == 0) | (h == 0) | (w * h > np.uint64(PIXEL_LIMIT)) | ~size_ok | (label < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        s = image[i]
        raise fail(f"has corrupt sample metadata ({int(bad.sum())} of {len(image)} samples, e.g. sample {i}: mode "
                   f"{int(s['mode'])}, {int(s['width'])} x {int(s['height'])} pixels, data at byte "
                   f"{int(s['data_ptr'])}{'' if found[i] else ' (no allocation of this sample)'}, label "
                   f"{int(label[i])})")
