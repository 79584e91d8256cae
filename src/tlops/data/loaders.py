"""Readers that turn a data source into ``RawData`` (inputs + string labels) with clear errors."""

from __future__ import annotations

import csv
import gzip
import io
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tlops.config import DataConfig
from tlops.data import archives
from tlops.errors import DataError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".pgm", ".ppm"}


@dataclass
class RawData:
    kind: str  # "image" or "text"
    x: Any  # uint8 array (N,H,W[,C]) for images, list[str] for text
    y: list[str]
    format: str
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.y)


def detect_format(source: str) -> str:
    if source.startswith("sklearn:"):
        return "sklearn"
    p = Path(source)
    if not p.exists():
        raise DataError(f"data.source: path not found: {source}")
    if p.is_dir():
        return "image-folder"
    if archives.is_archive(p):
        return "archive"
    name = p.name.lower().removesuffix(".gz")
    if name.endswith(".npz"):
        return "npz"
    if name.endswith(".csv"):
        return "csv"
    if name.endswith((".tsv", ".txt")):
        return "tsv"
    raise DataError(
        f"data.source: cannot tell the format of {source}; set data.format to one of "
        f"image-folder, npz, csv, tsv, sklearn (archives: {', '.join(archives.ARCHIVE_SUFFIXES)})"
    )


def load(cfg: DataConfig) -> RawData:
    if cfg.dvc is not None:
        return _load_dvc(cfg)
    if cfg.source.startswith("s3://"):
        return _load_s3(cfg)
    return _load_local(cfg)


def _load_dvc(cfg: DataConfig) -> RawData:
    """Fetch the exact DVC version to a temp dir and load it; ``info['dvc']`` records the version."""
    import shutil
    import tempfile

    from tlops.data import dvc_source

    tmp = Path(tempfile.mkdtemp(prefix="tlops-dvc-data-"))
    try:
        local = tmp / (Path(cfg.dvc.path).name or "data")
        version = dvc_source.fetch(cfg.dvc, local)
        try:
            data = _load_local(cfg.model_copy(update={"source": str(local), "dvc": None}))
        except DataError as e:
            raise DataError(str(e).replace(str(local), cfg.describe())) from None
        data.info = {**data.info, "dvc": version.as_dict()}
        return data
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_s3(cfg: DataConfig) -> RawData:
    """Download an ``s3://`` object (a file) or prefix (an image folder) to a temp dir and load it.

    Error messages name the S3 URI, not the temporary copy.
    """
    import shutil
    import tempfile

    from tlops.storage import S3Storage

    uri = cfg.source.rstrip("/")
    store = S3Storage()
    tmp = Path(tempfile.mkdtemp(prefix="tlops-s3-data-"))
    try:
        name = uri.rsplit("/", 1)[-1] or "data"
        if uri.count("/") > 2 and store.exists(uri):
            local = tmp / name
            store.download_file(uri, local)
        elif store.list(uri):
            local = tmp / name
            store.download_prefix(uri, local)
        else:
            raise DataError(f"data.source: not found: {cfg.source}")
        try:
            data = _load_local(cfg.model_copy(update={"source": str(local)}))
        except DataError as e:
            raise DataError(str(e).replace(str(local), uri)) from None
        data.info = {**data.info, "downloaded_from": uri}
        return data
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_archive(cfg: DataConfig) -> RawData:
    """Extract a .zip/.tar[.gz] safely into a temp dir and load what it holds (an image folder,
    or one data file). Error messages name the archive, not the temporary copy."""
    import shutil
    import tempfile

    src = Path(cfg.source)
    tmp = Path(tempfile.mkdtemp(prefix="tlops-archive-"))
    try:
        (tmp / "x").mkdir()
        root = archives.extract(src, tmp / "x")
        fmt = cfg.format
        if root.is_dir() and fmt == "auto":
            fmt = "image-folder"
        try:
            data = _load_local(cfg.model_copy(update={"source": str(root), "format": fmt}))
        except DataError as e:
            raise DataError(str(e).replace(str(tmp / "x"), f"{src}!")) from None
        data.info = {**data.info, "archive": src.name}
        return data
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_local(cfg: DataConfig) -> RawData:
    if cfg.format != "sklearn" and archives.is_archive(cfg.source):
        return _load_archive(cfg)
    fmt = detect_format(cfg.source) if cfg.format == "auto" else cfg.format
    if fmt != "sklearn" and not Path(cfg.source).exists():
        raise DataError(f"data.source: path not found: {cfg.source}")
    loader = {
        "sklearn": load_sklearn,
        "image-folder": load_image_folder,
        "npz": load_npz,
        "csv": load_delimited,
        "tsv": load_delimited,
    }[fmt]
    data = loader(cfg, fmt)
    if len(data) == 0:
        raise DataError(
            f"data.source: {cfg.source} contains no samples (empty dataset); "
            "point data.source at the data you meant or add samples to it"
        )
    return data


def load_sklearn(cfg: DataConfig, fmt: str) -> RawData:
    name = cfg.source.split(":", 1)[1]
    if name != "digits":
        raise DataError(f"data.source: unknown built-in dataset 'sklearn:{name}'; available: sklearn:digits")
    from sklearn.datasets import load_digits

    d = load_digits()
    # 8x8 images with values 0..16 -> uint8 0..255
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    return RawData("image", x, [str(int(v)) for v in d.target], "sklearn", {"dataset": "sklearn:digits"})


def load_image_folder(cfg: DataConfig, fmt: str) -> RawData:
    from PIL import Image, UnidentifiedImageError

    root = Path(cfg.source)
    if not root.is_dir():
        raise DataError(f"data.source: {root} is not a directory (image-folder format needs one sub-folder per class)")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"data.source: {root} has no class sub-folders; expected {root}/<class>/<image files>")
    files: list[tuple[Path, str]] = []
    empty = []
    for d in class_dirs:
        imgs = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
        if not imgs:
            empty.append(d.name)
        files += [(p, d.name) for p in imgs]
    if empty:
        raise DataError(
            f"data.source: empty class folder(s) in {root}: {', '.join(empty)} "
            f"(no files with extensions {', '.join(sorted(IMAGE_EXTS))}); add images or remove the folder"
        )
    arrays, labels, bad = [], [], []
    for p, label in files:
        try:
            with Image.open(p) as im:
                im.load()
                im = im.convert("RGB")
                if cfg.image_size:
                    im = im.resize((cfg.image_size, cfg.image_size), Image.BILINEAR)
                arrays.append(np.asarray(im, dtype=np.uint8))
                labels.append(label)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            bad.append(f"{p} ({type(e).__name__}: {e})")
    if bad:
        shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise DataError(
            f"data.source: cannot read {len(bad)} image file(s) in {root}:\n  {shown}\nremove or replace them"
        )
    shapes = sorted({a.shape for a in arrays})
    if len(shapes) > 1:
        raise DataError(
            f"data.source: images in {root} have different sizes "
            f"({', '.join('x'.join(map(str, s[:2])) for s in shapes[:5])}); "
            "set data.image_size to resize them to one square size"
        )
    return RawData("image", np.stack(arrays), labels, "image-folder", {"files": len(files)})


def load_npz(cfg: DataConfig, fmt: str) -> RawData:
    path = Path(cfg.source)
    if not zipfile.is_zipfile(path):
        raise DataError(f"data.source: cannot read {path}: not an NPZ archive (expected a file written by np.savez)")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.files)
            if "x" in keys and "y" in keys:
                pairs = [("x", "y")]
            else:
                pairs = [(k, "y" + k[1:]) for k in keys if k.startswith("x_") and "y" + k[1:] in keys]
            if not pairs:
                raise DataError(
                    f"data.source: {path} must hold arrays 'x' and 'y' (or x_<split>/y_<split> pairs); "
                    f"it has: {', '.join(keys)}"
                )
            xs = [z[a] for a, _ in pairs]
            ys = [z[b] for _, b in pairs]
            _check_split_labels(path, pairs, ys, cfg.classes)
    except ValueError as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise DataError(
                f"data.source: {path} contains object arrays; tlops never unpickles data. "
                "Save plain numeric arrays (np.savez(path, x=uint8_images, y=labels))"
            ) from None
        raise DataError(f"data.source: cannot read {path}: {e}") from None
    except (OSError, EOFError) as e:
        raise DataError(f"data.source: cannot read {path}: {e}") from None
    x = np.concatenate(xs)
    y = np.concatenate(ys)
    if x.ndim not in (3, 4) or len(x) != len(y):
        raise DataError(
            f"data.source: {path}: x must be images shaped (N,H,W) or (N,H,W,C) with one label each; "
            f"got x{tuple(x.shape)}, y{tuple(y.shape)}"
        )
    if x.dtype != np.uint8:
        if np.issubdtype(x.dtype, np.floating) and x.size and x.max() <= 1.0:
            x = x * 255.0
        x = np.clip(np.round(x), 0, 255).astype(np.uint8)
    return RawData("image", x, [str(v) for v in y.tolist()], "npz", {"arrays": [a for a, _ in pairs]})


def _check_split_labels(path: Path, pairs: list[tuple[str, str]], ys: list[np.ndarray], classes: list | None) -> None:
    """With predefined splits (``x_train``/``y_train``, ``x_test``/``y_test``...), every label of an
    evaluation split must occur in ``y_train``: a model cannot learn a class it never sees."""
    names = [b for _, b in pairs]
    if "y_train" not in names or len(pairs) < 2:
        return
    keep = None if classes is None else {str(c) for c in classes}
    train = {str(v) for v in ys[names.index("y_train")].tolist()}
    problems = []
    for name, y in zip(names, ys, strict=True):
        if name == "y_train" or not y.size:
            continue
        vals = [str(v) for v in y.tolist()]
        unseen = sorted({v for v in vals if v not in train and (keep is None or v in keep)})
        if unseen:
            counts = ", ".join(
                f"'{u}' ({vals.count(u)} sample{'s' if vals.count(u) != 1 else ''})" for u in unseen[:10]
            )
            problems.append(f"{name} has label(s) not seen in y_train: {counts}{' ...' if len(unseen) > 10 else ''}")
    if problems:
        raise DataError(
            f"data.source: {path}: "
            + "; ".join(problems)
            + ". Add training samples for these labels to y_train, or drop them with data.classes"
        )


def _read_text(path: Path, encoding: str) -> str:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"data.source: cannot read {path}: {e}") from None
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"data.source: {path} is not valid {encoding} (line {line}, byte {e.start}); "
            "convert it to UTF-8 or set data.encoding"
        ) from None


def load_delimited(cfg: DataConfig, fmt: str) -> RawData:
    path = Path(cfg.source)
    text = _read_text(path, cfg.encoding)
    delim = "\t" if fmt == "tsv" else ","
    quoting = csv.QUOTE_NONE if cfg.quoting == "none" else csv.QUOTE_MINIMAL
    # csv over StringIO(newline="") splits rows on \n / \r only, never on U+0085 or U+2028.
    rows = [r for r in csv.reader(io.StringIO(text, newline=""), delimiter=delim, quoting=quoting) if r]
    if not rows:
        raise DataError(f"data.source: {path} is empty")
    if cfg.columns:
        header, body = list(cfg.columns), rows
    else:
        header, body = rows[0], rows[1:]
    missing = [c for c in (cfg.text_column, cfg.label_column) if c not in header]
    if missing:
        hint = ""
        if len(header) == 1:
            foreign = [(d, n) for d, n in ((";", "';'"), ("|", "'|'")) if d in header[0]]
            if foreign:
                d, n = foreign[0]
                hint = (
                    f" (only one column found and its header contains {n}: the file is {n}-delimited, "
                    f"but tlops reads ',' (data.format=csv) or tab (data.format=tsv); convert it, e.g. "
                    f"pandas.read_csv(path, sep={d!r}).to_csv('{path.stem}.csv', index=False))"
                )
            else:
                other = "," if delim == "\t" else "tab"
                fix = "csv" if delim == chr(9) else "tsv"
                hint = (
                    f" (only one column found: is the delimiter right? the file was read as {fmt}; "
                    f"try data.format={fix} for {other})"
                )
        elif not cfg.columns:
            hint = " (if the file has no header row, name its columns with data.columns)"
        raise DataError(
            f"data.source: column(s) {', '.join(repr(m) for m in missing)} not found in {path}; "
            f"columns are: {', '.join(header)}{hint}; set data.text_column / data.label_column "
            f"(expected: {cfg.text_column!r} for the text and {cfg.label_column!r} for the label)"
        )
    ti, li = header.index(cfg.text_column), header.index(cfg.label_column)
    texts, labels, short = [], [], []
    for n, r in enumerate(body, start=1 if cfg.columns else 2):
        if len(r) != len(header):
            short.append(n)
            continue
        texts.append(r[ti])
        labels.append(r[li].strip())
    if short:
        raise DataError(
            f"data.source: {len(short)} row(s) of {path} do not have {len(header)} fields "
            f"(rows {', '.join(map(str, short[:10]))}{'...' if len(short) > 10 else ''}); "
            "check data.format (delimiter) and data.quoting"
        )
    return RawData("text", texts, labels, fmt, {"rows": len(texts)})
