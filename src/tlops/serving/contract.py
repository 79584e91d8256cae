"""The model's input/output contract, carried by the registered model (``contract.json``).

One module decides what a request may contain and what comes back, for every way a model is
called: ``mlflow.pyfunc.load_model(...).predict``, ``mlflow models serve`` and ``tlops serve``.

Images (a batch, never a bare single image):
- encoded PNG/JPEG: ``bytes``, base64 strings (``data:`` URIs too) or ``{"b64": ...}``;
- numeric arrays of any size and dtype: ``(N,H,W)``, ``(N,H,W,C)``, ``(N,C,H,W)``, rows of
  flattened square images ``(N,H*W)`` / ``(N,H*W*3)``, or a list of differently sized images.
Every image becomes uint8 pixels 0-255 like ingest makes them (PNG/JPEG decoded to RGB, floats
in 0-1 scaled by 255, as the npz loader does), then goes through the model's own ``prepare``
(channels, resize to the trained size, normalisation): the code training used. A value range
that cannot be what the model was trained on is refused, naming what was expected: negative
values (already normalised), values above 255, or images much darker than every training
image (e.g. sklearn's raw digits, 0-16, where training saw 0-255).

Text: the ``text`` column, else the only string column; or a list of strings.

Table formats (``dataframe_split``/``dataframe_records``) work for both: an ``image`` column (or
the only column) holding encoded images, or numeric columns holding flattened pixels.

Output: one row per input with ``label`` (top class), ``score`` (its probability), one
``prob_<class>`` column per class (all probabilities, named by class), and ``model_name``,
``model_version``, ``model_alias`` naming the model that answered.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tlops.errors import TlopsError

CONTRACT_FILE = "contract.json"
TEXT_COLUMN = "text"
IMAGE_COLUMN = "image"
IDENTITY_COLUMNS = ("model_name", "model_version", "model_alias")
#: an image is refused when its brightest pixel is below this fraction of the 1st percentile of the
#: training images' brightest pixels (only for models trained on images that use the 0-255 range)
DARK_FRACTION = 0.25
MIN_TRAINED_PEAK = 128.0


class ContractError(TlopsError):
    """A request does not meet the model's input contract (an HTTP 400: the caller must fix it)."""


def image_stats(x: np.ndarray) -> dict[str, Any]:
    """What the training images looked like, for the range guard (x: uint8 (N,H,W[,C]))."""
    x = np.asarray(x)
    peaks = x.reshape(len(x), -1).max(1).astype(np.float64) if len(x) else np.zeros(1)
    return {
        "dtype": str(x.dtype),
        "shape": [int(s) for s in x.shape[1:]],
        "min": float(x.min()) if x.size else 0.0,
        "max": float(x.max()) if x.size else 0.0,
        "peak_p01": float(np.percentile(peaks, 1)),
        "peak_p50": float(np.percentile(peaks, 50)),
    }


def build_contract(spec: dict[str, Any], *, model_name: str, train_x: Any = None) -> dict[str, Any]:
    """The contract of a trained bundle (``spec`` = its bundle.json), with training statistics."""
    pre = spec.get("preprocessing", {})
    modality = pre.get("modality") or ("text" if spec.get("kind") == "hf" else "image")
    doc: dict[str, Any] = {
        "format": "tlops-contract",
        "version": 1,
        "model_name": model_name,
        "modality": modality,
        "classes": [str(c) for c in spec.get("classes", [])],
        "preprocessing": pre,
    }
    if modality == "image":
        doc["input"] = {
            "kind": "image",
            "column": IMAGE_COLUMN,
            "pixels": "uint8 0-255 (floats in 0-1 are scaled by 255); PNG/JPEG bytes or base64",
            "trained": image_stats(train_x) if train_x is not None else None,
        }
    else:
        doc["input"] = {"kind": "text", "column": TEXT_COLUMN, "max_length": pre.get("max_length")}
    doc["output"] = {"columns": ["label", "score", *[f"prob_{c}" for c in doc["classes"]], *IDENTITY_COLUMNS]}
    return doc


class Contract:
    def __init__(self, doc: dict[str, Any]):
        self.doc = doc
        self.modality: str = doc["modality"]
        self.classes: list[str] = list(doc["classes"])
        self.model_name: str | None = doc.get("model_name")

    @classmethod
    def load(cls, path: str | Path) -> "Contract":
        return cls(json.loads(Path(path).read_text()))

    @classmethod
    def from_bundle(cls, bundle: str | Path, model_name: str | None = None) -> "Contract":
        """For models registered before contracts were logged: the bundle's spec, no range statistics."""
        from tlops.models.bundle_files import read_spec

        return cls(build_contract(read_spec(Path(bundle)), model_name=model_name or ""))

    # -- inputs -------------------------------------------------------------------------------
    def parse(self, payload: Any, *, allow_paths: bool = False) -> Any:
        """Canonical inputs: a list of strings (text) or a list of uint8 images (image).

        ``allow_paths``: strings naming image files are read (Python callers only; never over HTTP)."""
        items = self._text(payload) if self.modality == "text" else self._images(payload, allow_paths)
        if not items:
            raise ContractError("the request holds no inputs; send at least one " + self.modality)
        return items

    def _text(self, payload: Any) -> list[str]:
        import pandas as pd

        if isinstance(payload, pd.DataFrame):
            payload = {c: payload[c].tolist() for c in payload.columns}
        if isinstance(payload, dict):
            payload = {str(k): _as_list(v) for k, v in payload.items()}
            if TEXT_COLUMN in payload:
                values = payload[TEXT_COLUMN]
            else:
                strings = [k for k, v in payload.items() if v and all(isinstance(s, str) for s in v)]
                if len(strings) != 1:
                    raise ContractError(
                        f"text input: expected a '{TEXT_COLUMN}' column or exactly one string column; got columns "
                        f"{sorted(payload)} ({len(strings)} of them hold strings)"
                    )
                values = payload[strings[0]]
        elif isinstance(payload, str):
            values = [payload]
        else:
            values = _as_list(payload)
        bad = [(i, type(v).__name__) for i, v in enumerate(values) if not isinstance(v, str)]
        if bad:
            shown = ", ".join(f"#{i} is {t}" for i, t in bad[:5])
            raise ContractError(f"text input: every item must be a string; {shown}")
        return list(values)

    def _images(self, payload: Any, allow_paths: bool) -> list[np.ndarray]:
        import pandas as pd

        if isinstance(payload, pd.DataFrame):
            cols = list(payload.columns)
            if IMAGE_COLUMN in cols or (len(cols) == 1 and payload[cols[0]].dtype == object):
                payload = payload[IMAGE_COLUMN if IMAGE_COLUMN in cols else cols[0]].tolist()
            elif all(pd.api.types.is_numeric_dtype(payload[c]) for c in cols):
                payload = payload.to_numpy()  # rows of flattened pixels
            else:
                raise ContractError(
                    f"image input: a table needs an '{IMAGE_COLUMN}' column of encoded images (base64 PNG/JPEG) "
                    f"or only numeric columns (flattened pixels); got columns {cols}"
                )
        elif isinstance(payload, dict):
            keys = list(payload)
            if IMAGE_COLUMN not in keys and len(keys) != 1:
                raise ContractError(f"image input: expected an '{IMAGE_COLUMN}' input; got {sorted(keys)}")
            if keys == ["b64"]:  # TF-serving style {"b64": ...}; MLflow turns `instances` of them into columns
                payload = _as_list(payload["b64"]) if not isinstance(payload["b64"], str) else [payload]
            else:
                payload = payload[IMAGE_COLUMN if IMAGE_COLUMN in keys else keys[0]]
        elif isinstance(payload, (str, bytes, Path)):
            payload = [payload]
        if isinstance(payload, pd.Series):
            payload = payload.tolist()
        if isinstance(payload, np.ndarray) and payload.dtype != object and payload.dtype.kind not in "SUO":
            images = _split_batch(payload)
        else:
            items = list(payload) if isinstance(payload, (list, tuple, np.ndarray)) else None
            if items is None:
                raise ContractError(f"image input: unsupported payload type {type(payload).__name__}")
            if items and not any(_is_encoded(v) for v in items) and _numeric_nested(items):
                try:
                    images = _split_batch(np.asarray(items))
                except ValueError:  # ragged: differently sized images
                    images = [_one_image(np.asarray(v), i) for i, v in enumerate(items)]
            else:
                images = [self._decode(v, i, allow_paths) for i, v in enumerate(items)]
        return [self._guard(_to_uint8(im, i), i) for i, im in enumerate(images)]

    def _decode(self, v: Any, i: int, allow_paths: bool) -> np.ndarray:
        if isinstance(v, Path) or (allow_paths and isinstance(v, str) and Path(v).is_file()):
            return _decode_image(Path(v).read_bytes(), i)
        if isinstance(v, dict) and "b64" in v:
            v = v["b64"]
        if isinstance(v, str):
            return _decode_image(_b64(v, i), i)
        if isinstance(v, (bytes, bytearray, memoryview)):
            return _decode_image(bytes(v), i)
        if isinstance(v, (list, tuple, np.ndarray)):
            return _one_image(np.asarray(v), i)
        raise ContractError(
            f"image #{i}: expected PNG/JPEG bytes, a base64 string or a pixel array; got {type(v).__name__}"
        )

    def _guard(self, im: np.ndarray, i: int) -> np.ndarray:
        trained = (self.doc.get("input") or {}).get("trained")
        if not trained or trained.get("peak_p01", 0) < MIN_TRAINED_PEAK:
            return im
        floor = DARK_FRACTION * trained["peak_p01"]
        peak = int(im.max()) if im.size else 0
        if peak < floor:
            raise ContractError(
                f"image #{i}: pixel values range {int(im.min())}-{peak}, but this model was trained on 0-255 images "
                f"(the brightest pixel of 99% of training images is >= {trained['peak_p01']:.0f}); this looks like a "
                f"different scale (e.g. sklearn digits are 0-16: multiply by 255/16). Send uint8 0-255 pixels, "
                f"floats in 0-1, or PNG/JPEG bytes"
            )
        return im

    def predict_proba(self, clf: Any, items: Sequence[Any]) -> np.ndarray:
        """Class probabilities for canonical inputs; images are batched by shape through ``clf.prepare``."""
        if self.modality == "text":
            return clf.predict_proba(list(items))
        out = np.zeros((len(items), len(self.classes)), dtype=np.float32)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, im in enumerate(items):
            groups.setdefault(im.shape, []).append(i)
        for idx in groups.values():
            out[idx] = clf.predict_proba(np.stack([items[i] for i in idx]))
        return out

    # -- outputs ------------------------------------------------------------------------------
    def frame(self, probs: np.ndarray, identity: dict[str, Any] | None = None) -> Any:
        """The output table: label, score, prob_<class>..., and the model that answered."""
        import pandas as pd

        identity = identity or {}
        df = pd.DataFrame({"label": [self.classes[i] for i in probs.argmax(1)], "score": probs.max(1).astype(float)})
        for i, c in enumerate(self.classes):
            df[f"prob_{c}"] = probs[:, i].astype(float)
        for col in IDENTITY_COLUMNS:
            v = identity.get(col)
            df[col] = None if v is None else str(v)
        return df


def _as_list(v: Any) -> list:
    if isinstance(v, np.ndarray):
        return v.reshape(-1).tolist() if v.ndim > 1 else v.tolist()
    if isinstance(v, (list, tuple)):
        return list(v)
    if hasattr(v, "tolist"):
        return v.tolist()
    return [v]


def _is_encoded(v: Any) -> bool:
    return isinstance(v, (str, bytes, bytearray, memoryview, dict, Path))


def _numeric_nested(items: list) -> bool:
    v: Any = items[0]
    while isinstance(v, (list, tuple, np.ndarray)) and len(v):
        v = v[0]
    return isinstance(v, (int, float, np.number, bool, np.bool_))


def _split_batch(a: np.ndarray) -> list[np.ndarray]:
    """A numeric batch into images (H,W) or (H,W,C)."""
    if a.dtype == object:
        raise ValueError("ragged")
    if a.ndim == 4:
        if a.shape[-1] in (1, 3, 4):
            return list(a)
        if a.shape[1] in (1, 3, 4):
            return list(a.transpose(0, 2, 3, 1))
        raise ContractError(f"image input of shape {tuple(a.shape)}: expected (N,H,W,C) or (N,C,H,W) with C in 1, 3, 4")
    if a.ndim == 3:
        if a.shape[-1] in (3, 4) and a.shape[1] > 4:
            raise ContractError(
                f"image input of shape {tuple(a.shape)} looks like one (H,W,C) image; send a batch: (1,H,W,C)"
            )
        return list(a)
    if a.ndim == 2:
        n = a.shape[1]
        side = math.isqrt(n)
        if side * side == n:
            return list(a.reshape(len(a), side, side))
        side = math.isqrt(n // 3)
        if n % 3 == 0 and side * side * 3 == n:
            return list(a.reshape(len(a), side, side, 3))
        raise ContractError(
            f"image input of shape {tuple(a.shape)}: 2-D input is a batch of flattened square images (H*W or H*W*3 "
            f"values per row); {n} is neither. Send (N,H,W) or (N,H,W,C) arrays (one image is a batch of one)"
        )
    raise ContractError(
        f"image input of shape {tuple(a.shape)}: expected a batch (N,H,W), (N,H,W,C), (N,C,H,W) or (N,H*W); "
        f"one image is a batch of one"
    )


def _one_image(a: np.ndarray, i: int) -> np.ndarray:
    if a.ndim == 2:
        return a
    if a.ndim == 3 and a.shape[-1] in (1, 3, 4):
        return a
    if a.ndim == 3 and a.shape[0] in (1, 3, 4):
        return a.transpose(1, 2, 0)
    raise ContractError(f"image #{i} of shape {tuple(a.shape)}: expected (H,W), (H,W,C) or (C,H,W)")


def _b64(s: str, i: int) -> bytes:
    if s.startswith("data:"):
        s = s.split(",", 1)[-1]
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise ContractError(f"image #{i}: a string must be a base64-encoded PNG/JPEG (or a data: URI)") from None


def _decode_image(data: bytes, i: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)  # as ingest reads image files
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ContractError(f"image #{i}: not a readable PNG/JPEG ({type(e).__name__}: {e})") from None


def _to_uint8(im: np.ndarray, i: int) -> np.ndarray:
    """Pixels 0-255 as uint8, by ingest's rule (floats in 0-1 are scaled by 255); anything else refused."""
    im = np.asarray(im)
    if im.dtype == np.uint8:
        pass
    elif im.dtype.kind in "iuf":
        if im.dtype.kind == "f" and not np.isfinite(im).all():
            raise ContractError(f"image #{i}: holds NaN or infinite values")
        lo, hi = (float(im.min()), float(im.max())) if im.size else (0.0, 0.0)
        if lo < 0:
            raise ContractError(
                f"image #{i}: values range {lo:g} to {hi:g}; negative values look already normalised. Send raw "
                f"pixels (uint8 0-255 or floats 0-1): the model applies its own mean/std"
            )
        if hi > 255:
            raise ContractError(f"image #{i}: values up to {hi:g}; expected pixels 0-255 (uint8) or floats 0-1")
        if im.dtype.kind == "f" and hi <= 1.0:
            im = im * 255.0
        im = np.clip(np.round(im), 0, 255).astype(np.uint8)
    else:
        raise ContractError(f"image #{i}: pixel dtype {im.dtype} is not numeric")
    if im.ndim == 3 and im.shape[-1] == 4:
        im = im[..., :3]  # ingest reads RGBA files as RGB
    if im.ndim == 3 and im.shape[-1] == 1:
        im = im[..., 0]
    if im.ndim not in (2, 3) or min(im.shape[:2]) < 1:
        raise ContractError(f"image #{i}: shape {tuple(im.shape)} is not an image")
    return np.ascontiguousarray(im)
