"""How many classes a data set holds, so that ``data.num_classes`` can be left unset: the class sub-folders
of an ImageFolder (as ``torchvision.datasets.ImageFolder`` finds them: folder names only, no file walk),
or one more than the largest label of an FFCV ``.beton`` written by ``fdfast-convert`` (read from its
metadata table, not from the images)."""
from __future__ import annotations

from pathlib import Path

from torchvision.datasets.folder import find_classes

from fdfast.config.data import DataConfig

from .base import DataError, MissingDependency
from .beton import check_beton
from .ffcv import INSTALL_HINT
from .folder import LAYOUT


def folder_classes(root: str, key: str) -> int:
    """Class sub-folders of the ImageFolder at ``root`` (``key``: where the path came from, for errors)."""
    path = Path(root)
    if not path.is_dir():
        raise DataError(f"{key}='{root}' is not a folder (expected an ImageFolder: {LAYOUT})")
    try:
        return len(find_classes(path)[0])
    except FileNotFoundError:
        raise DataError(f"{key}='{root}' has no class sub-folders (expected an ImageFolder: {LAYOUT})") from None


def beton_classes(path: str, key: str) -> int:
    """One more than the largest label of an FFCV file (checked as the FFCV backend checks it)."""
    try:
        import ffcv.types  # noqa: F401 - optional dependency, whose dtypes the check reads the file with
    except (ImportError, OSError) as e:
        raise MissingDependency(f"{key}='{path}' is a .beton, whose classes FFCV reads, and ffcv failed to import "
                                f"({type(e).__name__}: {e}); {INSTALL_HINT}") from e
    if not Path(path).is_file():
        raise DataError(f"{key}='{path}' does not exist (build it with fdfast-convert)")
    return int(check_beton(path, key).max()) + 1  # check_beton refuses a file without samples


def data_classes(data: DataConfig) -> int | None:
    """Classes of ``data.train``; None for the synthetic backend (its labels come from the config)."""
    if data.backend == "synthetic":
        return None
    if data.backend == "ffcv":
        return beton_classes(data.train, "data.train")
    return folder_classes(data.train, "data.train")
