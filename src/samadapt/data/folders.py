"""Folder datasets: a plain folder of images (unlabelled) and ImageFolder (one subfolder per class).

- Plain folder: every image file under the folder, recursively, sorted by relative path; ids are those
  relative paths. Image files are known by suffix, and DICOM files also by their ``DICM`` magic bytes (exports
  often name them ``IM0001`` or by UID); a ``DICOMDIR`` index is not an image. Hidden files and folders
  (``.name``) and ``__MACOSX`` are skipped.
- ImageFolder: ``root/<class>/**/<image>``, or with splits ``root/{train,val|valid|validation,test}/<class>/...``.
  Class names are the sorted union of class folders over all splits, so indices agree between splits.
  An empty class folder is kept as a class and warned about; files beside the class folders are ignored
  with a warning.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from samadapt.data.dataset import ImageDataset
from samadapt.data.images import IMAGE_SUFFIXES, has_dicom_magic, read_image
from samadapt.data.labels import encode_labels
from samadapt.data.splits import SPLIT_ALIASES
from samadapt.errors import DataError


def _visible(path: Path) -> bool:
    return not path.name.startswith(".") and path.name != "__MACOSX"


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and _visible(p))


def list_images(folder: Path, *, recursive: bool = True) -> list[Path]:
    """Image files in ``folder`` (by suffix, or DICOM magic bytes), sorted by their path relative to it.

    Other files are skipped with one warning that names them (never dropped silently)."""
    skipped: list[Path] = []
    found = _scan(folder, recursive=recursive, skipped=skipped)
    if skipped:
        names = ", ".join(p.relative_to(folder).as_posix() for p in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        warnings.warn(
            f"{folder}: skipped {len(skipped)} file(s) that are not images: {names}{more}", stacklevel=2
        )
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def collect_images(items: Sequence[str | Path]) -> list[Path]:
    """Image files named on a command line: files as given, folders expanded by `list_images`; a missing path or
    nothing found is a DataError naming it."""
    files: list[Path] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            files.extend(list_images(path))
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: no such image file or folder")
    if not files:
        raise DataError(f"no images found in {', '.join(str(i) for i in items)}")
    return files


def _scan(folder: Path, *, recursive: bool, skipped: list[Path]) -> list[Path]:
    found: list[Path] = []
    for entry in sorted(folder.iterdir()):
        if not _visible(entry):
            continue
        if entry.is_dir():
            if recursive:
                found.extend(_scan(entry, recursive=True, skipped=skipped))
        elif entry.suffix.lower() in IMAGE_SUFFIXES or (entry.name != "DICOMDIR" and has_dicom_magic(entry)):
            found.append(entry)
        elif entry.name != "DICOMDIR":
            skipped.append(entry)
    return found


def split_folders(root: Path) -> dict[str, Path]:
    """{"train": root/train, ...} for the split folders present in ``root`` (any alias spelling)."""
    found: dict[str, Path] = {}
    for folder in _subdirs(root):
        name = SPLIT_ALIASES.get(folder.name.lower())
        if name is None:
            continue
        if name in found:
            raise DataError(
                f"{root}: two folders for the {name} split: {found[name].name}/ and {folder.name}/"
            )
        found[name] = folder
    return found


def looks_like_image_folder(root: Path) -> bool:
    """True when ``root`` has split folders, or class subfolders with images and no images of its own."""
    if split_folders(root):
        return True
    if list_images(root, recursive=False):
        return False
    return any(list_images(folder) for folder in _subdirs(root))


def read_images(source: Path, *, size_hint: int | None = None, recursive: bool = True) -> ImageDataset:
    """An unlabelled dataset of every image under ``source`` (or of the single image file ``source``)."""
    if source.is_file():
        root, files = source.parent, [source]
    else:
        root, files = source, list_images(source, recursive=recursive)
    if not files:
        raise DataError(f"{source}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}, or DICOM) found")
    return ImageDataset(
        ids=[f.relative_to(root).as_posix() for f in files],
        labels=None,
        splits=[None] * len(files),
        class_names=[],
        source=source,
        format="images",
        locators=files,
        load=functools.partial(read_image, size_hint=size_hint),
        paths=files,
    )


def _class_images(parent: Path, context: str) -> dict[str, list[Path]]:
    stray = list_images(parent, recursive=False)
    if stray:
        warnings.warn(
            f"{parent}: ignoring {len(stray)} image(s) outside class folders ({context})", stacklevel=3
        )
    classes = {folder.name: list_images(folder) for folder in _subdirs(parent)}
    for name, files in classes.items():
        if not files:
            warnings.warn(f"{parent / name}: class folder holds no images", stacklevel=3)
    return classes


def read_image_folder(
    root: Path, *, size_hint: int | None = None, class_names: Sequence[str] | None = None
) -> ImageDataset:
    """An ImageFolder dataset (class subfolders, optionally under train/val/test folders)."""
    splits_found = split_folders(root)
    groups: dict[str | None, dict[str, list[Path]]] = {}
    if splits_found:
        others = [p.name for p in _subdirs(root) if p.name.lower() not in SPLIT_ALIASES]
        if others:
            warnings.warn(f"{root}: ignoring folder(s) {others} beside the split folders", stacklevel=2)
        for name, folder in splits_found.items():
            groups[name] = _class_images(folder, f"{name} split")
    else:
        groups[None] = _class_images(root, "no split folders")
    folder_classes = sorted({name for classes in groups.values() for name in classes})
    if class_names is not None:
        unknown = sorted(set(folder_classes) - set(class_names))
        if unknown:
            raise DataError(
                f"{root}: class folder(s) {unknown} not among the class names {list(class_names)}"
            )
    files, labels, splits = [], [], []
    for split, classes in groups.items():
        for name, paths in classes.items():
            files.extend(paths)
            labels.extend([name] * len(paths))
            splits.extend([split] * len(paths))
    if not files:
        raise DataError(f"{root}: no images found in any class folder")
    indices, names = encode_labels(labels, class_names=class_names or folder_classes, source=root)
    order = np.argsort([f.relative_to(root).as_posix() for f in files], kind="stable")
    files = [files[i] for i in order]
    return ImageDataset(
        ids=[f.relative_to(root).as_posix() for f in files],
        labels=indices[order],
        splits=[splits[i] for i in order],
        class_names=names,
        source=root,
        format="imagefolder",
        locators=files,
        load=functools.partial(read_image, size_hint=size_hint),
        paths=files,
    )
