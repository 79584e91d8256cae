"""Extraction backends: the same backbone run by PyTorch fp32, PyTorch dynamic int8, ONNX Runtime or OpenVINO.

``features.backend`` picks how extract-features runs the (frozen) backbone; the features of every
backend come from the same weights, tokenizer/resizing (``prepare``) and pooling/normalisation, so
the ONNX fp32 features equal PyTorch's to ~1e-6, and int8 ones differ only by quantisation error:

- ``torch``: the backbone as it is (fp32 eager).
- ``torch-int8``: ``torch.ao.quantization.quantize_dynamic`` on the ``nn.Linear`` layers (per-channel
  int8 weights, activations quantised per batch). Text backbones only: dynamic quantisation has no
  convolution kernel, so a CNN would run unchanged in fp32; asking for it is an error naming
  ``onnx-int8``.
- ``onnx``: the whole ``forward`` (pooling and L2 normalisation included) exported once with
  ``torch.onnx.export(dynamo=True)`` with dynamic batch (and sequence) axes, run by onnxruntime's
  CPU provider with torch's thread count.
- ``onnx-int8``: text: ``onnxruntime.quantization.quantize_dynamic`` (per-channel int8 weights,
  activations quantised per batch; what sentence-transformers ships). Images: ``quantize_static``
  (QDQ, per-channel int8 weights, uint8 activations) calibrated on the run's own images, because
  ORT's dynamic ConvInteger path was slower than fp32 on resnet10t (a trial) while static
  QDQ convolutions run on int8 kernels.
- ``torch-compile``: the backbone's ``forward`` through ``torch.compile`` (Inductor, dynamic shapes);
  nothing is stored, so every run pays the compile (minutes on a 2-core CPU for MiniLM, and no
  faster afterwards there: ``bench/results/compile.md``). For GPUs, where Inductor's kernels can
  pay; ``auto`` never picks it, because its sample timing cannot see the compile.
- ``openvino`` / ``openvino-bf16`` / ``openvino-int8``: the same ONNX file converted to OpenVINO IR
  (fp32), run in fp32 or in bf16 on CPUs with native bf16 (AMX), and NNCF's post-training int8
  quantisation of it calibrated on the run's own inputs (text too: tokenised sentences); an
  optional extra, see :mod:`tlops.features.backends_openvino`.

Exported and quantised files live in a local store (``<workdir>/cache/backends``) under a key of
the model's content digest, its preprocessing (pooling, normalisation), the backend, the calibration
data and the exporter's versions, so a model is exported once and every later run loads the file.
A backend other than ``torch`` is part of the feature-cache key (:func:`key_preprocessing`), so
features of different backends never mix. ``auto`` is resolved in :mod:`tlops.features.backend_choice`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from tlops.errors import ConfigError
from tlops.features.backend_store import entry_dir, lock_path, write_entry
from tlops.features.exported import ExportedBackbone
from tlops.hashing import hash_json

log = logging.getLogger(__name__)

OPENVINO = ("openvino", "openvino-bf16", "openvino-int8")
BACKENDS = ("torch", "torch-compile", "torch-int8", "onnx", "onnx-int8") + OPENVINO
CHOICES = ("auto",) + BACKENDS
EXPORT_VERSION = 1  # bump when the export / quantisation recipe changes (new files, new feature keys)
CALIBRATION_ROWS = 128  # inputs that calibrate the static int8 models (ORT's and NNCF's MinMax ranges)


def supported(modality: str) -> tuple[str, ...]:
    """The backends that make sense for a modality (``torch-int8`` leaves a CNN's convolutions fp32)."""
    return BACKENDS if modality == "text" else tuple(b for b in BACKENDS if b != "torch-int8")


def available(modality: str) -> tuple[str, ...]:
    """``auto``'s candidates: :func:`supported` less the OpenVINO backends whose packages are not installed
    (and ``openvino-bf16`` on a CPU without native bf16), and less ``torch-compile`` (its cost is the
    compile, which a timed sample after a warm-up batch hides)."""
    from tlops.features import backends_openvino

    return tuple(
        b for b in supported(modality) if b != "torch-compile" and (b not in OPENVINO or backends_openvino.usable(b))
    )


def needs_calibration(backend: str, modality: str | None) -> bool:
    """Static int8: activation ranges measured on the run's own inputs (images for ``onnx-int8``; both
    modalities for ``openvino-int8``). Dynamic int8 (``onnx-int8`` text, ``torch-int8``) needs none."""
    return backend == "openvino-int8" or (backend == "onnx-int8" and modality == "image")


def kind_of(backbone: nn.Module) -> str:
    """The bundle kind of a loaded backbone (``hf``, ``timm``, or its class name)."""
    return {"TextBackbone": "hf", "ImageBackbone": "timm"}.get(type(backbone).__name__, type(backbone).__name__)


def check(backend: str, modality: str | None, kind: str) -> None:
    """Refuse an unknown backend, or one this backbone (bundle ``kind``) cannot use, saying what to pick."""
    if backend not in CHOICES:
        raise ConfigError(f"features.backend: unknown backend {backend!r}; valid: {', '.join(CHOICES)}")
    if backend != "torch" and kind not in ("hf", "timm"):
        raise ConfigError(
            f"features.backend {backend!r}: only single timm or Hugging Face backbones can be exported or "
            f"quantised (this model is a {kind!r} bundle); use features.backend: torch"
        )
    if backend != "auto" and backend not in supported(str(modality)):
        raise ConfigError(
            f"features.backend {backend!r} is not supported for {modality} backbones: PyTorch dynamic "
            "quantisation only converts nn.Linear layers, so a CNN's convolutions would stay fp32; "
            "use onnx-int8 (static int8 convolutions) or onnx"
        )
    if backend in OPENVINO:
        from tlops.features.backends_openvino import require

        require(backend)


def key_preprocessing(preprocessing: dict[str, Any], backend: str) -> dict[str, Any]:
    """The preprocessing part of the feature-cache key: unchanged for ``torch`` (existing entries stay
    valid), with the backend and the export recipe's version otherwise."""
    if backend == "torch":
        return preprocessing
    if backend not in BACKENDS:
        raise ConfigError(f"feature cache key: backend {backend!r} is not resolved (valid: {', '.join(BACKENDS)})")
    return {**preprocessing, "backend": backend, "backend_version": EXPORT_VERSION}


def ort_threads() -> int:
    return max(1, torch.get_num_threads())


class OnnxBackbone(ExportedBackbone):
    """An onnxruntime session behind the backbone interface ``extract`` uses."""

    def __init__(self, backbone: nn.Module, path: Path, backend: str):
        super().__init__(backbone, path, backend)
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = ort_threads()
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self._inputs = [i.name for i in self.session.get_inputs()]

    def forward(self, **tensors: torch.Tensor) -> torch.Tensor:
        feeds = {k: tensors[k].cpu().numpy() for k in self._inputs}
        return torch.from_numpy(self.session.run(None, feeds)[0])


class CompiledBackbone(nn.Module):
    """``backbone`` with its ``forward`` compiled by ``torch.compile`` (dynamic batch and sequence
    shapes, so length-sorted text batches do not recompile per length); the parameters stay the
    backbone's, so ``extract`` finds their device as for the eager module."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.modality = backbone.modality
        self.preprocessing = dict(backbone.preprocessing, backend="torch-compile")
        self._forward = torch.compile(backbone.forward, dynamic=True)

    @property
    def feature_dim(self) -> int:
        return int(self.backbone.feature_dim)

    def prepare(self, batch: Any) -> dict[str, torch.Tensor]:
        return self.backbone.prepare(batch)

    def forward(self, **tensors: torch.Tensor) -> torch.Tensor:
        return self._forward(**tensors)


def _example(backbone: nn.Module) -> dict[str, torch.Tensor]:
    if backbone.modality == "text":
        return backbone.prepare(["a short example", "a somewhat longer example sentence for the exporter"])
    size, chans = backbone.preprocessing["image_size"], backbone.preprocessing["in_chans"]
    return backbone.prepare(np.zeros((2, size, size, chans), dtype=np.uint8))


def export_onnx(backbone: nn.Module, dst: Path) -> None:
    """``backbone.forward`` (pooling and normalisation included) as ONNX, batch (and sequence) dynamic."""
    example = _example(backbone)
    batch = torch.export.Dim("batch")
    if backbone.modality == "text":
        seq = torch.export.Dim("sequence")
        dims = {k: {0: batch, 1: seq} for k in example}
    else:
        dims = {k: {0: batch} for k in example}
    module = copy.deepcopy(backbone).cpu().float().eval()
    with warnings_quiet():
        program = torch.onnx.export(
            module,
            (),
            kwargs=example,
            input_names=list(example),
            output_names=["features"],
            dynamic_shapes=dims,
            dynamo=True,
            verbose=False,  # else its progress lines go to stdout, into the CLI output and KFP task logs
        )
    program.save(str(dst))


@contextlib.contextmanager
def warnings_quiet():
    """The exporter warns about every traced transformers shape check; none concerns the user."""
    import warnings

    level = logging.getLogger("torch.onnx").level
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            logging.getLogger("torch.onnx").setLevel(level)


def quantize_onnx(src: Path, dst: Path, modality: str, calibration: Sequence[dict[str, np.ndarray]] | None) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if modality == "text":
        # per-channel weights: per-tensor scales visibly moved MiniLM's features further from fp32 (a trial)
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True)
        return
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not calibration:
        raise ConfigError("features.backend onnx-int8 for images needs calibration images (the run's train split)")

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    pre = dst.with_name(dst.stem + ".pre.onnx")
    quant_pre_process(str(src), str(pre))
    quantize_static(
        str(pre),
        str(dst),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
    )
    pre.unlink(missing_ok=True)


def _versions(backend: str) -> dict[str, str]:
    import onnxruntime

    out = {"torch": torch.__version__.split("+")[0], "onnxruntime": onnxruntime.__version__, "v": str(EXPORT_VERSION)}
    if backend in OPENVINO:
        from tlops.features.backends_openvino import versions

        out.update(versions(backend))
    return out


def _calibration_batches(backbone: nn.Module, calibration: Any, backend: str) -> list[dict[str, np.ndarray]]:
    """The first ``CALIBRATION_ROWS`` inputs, prepared (resized / tokenised) as extraction prepares them."""
    if calibration is None or len(calibration) == 0:
        raise ConfigError(f"features.backend {backend}: static int8 needs calibration inputs (the run's train split)")
    x = calibration[:CALIBRATION_ROWS]
    return [{k: v.numpy() for k, v in backbone.prepare(x[i : i + 32]).items()} for i in range(0, len(x), 32)]


def model_file(
    backbone: nn.Module,
    backend: str,
    *,
    model_digest: str,
    store: str | os.PathLike,
    calibration: Any = None,
    calibration_id: str | None = None,
) -> Path:
    """The exported (and quantised) ONNX file, or OpenVINO IR ``model.xml``, of this model and backend,
    made once per key under a lock."""
    from tlops.storage import file_lock

    if backend == "openvino-bf16":  # the fp32 IR, compiled for bf16 when it is loaded: no file of its own
        return model_file(backbone, "openvino", model_digest=model_digest, store=store)
    cal = calibration_id if needs_calibration(backend, backbone.modality) else None
    key = hash_json(
        {
            "model": model_digest,
            "pre": backbone.preprocessing,
            "backend": backend,
            "cal": cal,
            "ver": _versions(backend),
        }
    )
    path = entry_dir(store, key) / ("model.xml" if backend in OPENVINO else "model.onnx")
    if path.is_file():
        return path
    with file_lock(lock_path(store, key), what=f"ONNX export {key[:16]}"):
        if path.is_file():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        write_entry(path.parent, model_digest, backend)  # whose model this is, for tlops gc
        with tempfile.TemporaryDirectory(prefix=".export-", dir=path.parent) as tmp:
            out = Path(tmp) / path.name
            batches = _calibration_batches(backbone, calibration, backend) if cal is not None else None
            if backend == "onnx":
                export_onnx(backbone, out)
            elif backend == "onnx-int8":  # quantised from the (cached) fp32 export: one export per model
                fp32 = model_file(backbone, "onnx", model_digest=model_digest, store=store)
                quantize_onnx(fp32, out, backbone.modality, batches)
            else:
                from tlops.features import backends_openvino as ovb

                if backend == "openvino":  # converted from the (cached) ONNX export
                    ovb.convert(model_file(backbone, "onnx", model_digest=model_digest, store=store), out)
                else:  # quantised from the (cached) fp32 IR
                    fp32 = model_file(backbone, "openvino", model_digest=model_digest, store=store)
                    ovb.quantize(fp32, out, backbone.modality, batches or [])
                ovb.write(path.parent, Path(tmp))
            if backend not in OPENVINO:
                os.replace(out, path)  # model.onnx appears complete or not at all
        log.info("features: %s model of %s written to %s", backend, model_digest[:16], path)
    return path


def build(
    backbone: nn.Module,
    backend: str,
    *,
    model_digest: str,
    store: str | os.PathLike,
    calibration: Any = None,
    calibration_id: str | None = None,
) -> nn.Module:
    """A module that ``tlops.features.extract.extract`` runs: ``backbone`` as ``backend`` runs it."""
    check(backend, getattr(backbone, "modality", None), kind_of(backbone))
    if backend == "auto":
        raise ConfigError("features.backend auto is resolved by tlops.features.backend_choice, not built")
    if backend == "torch":
        return backbone
    if backend == "torch-compile":
        return CompiledBackbone(backbone)
    if backend == "torch-int8":
        with warnings_quiet():  # deprecated in favour of torchao, which is not a dependency
            q = torch.ao.quantization.quantize_dynamic(  # per-channel weights, as for onnx-int8
                copy.deepcopy(backbone).cpu().float().eval(),
                {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig},
                dtype=torch.qint8,
                inplace=True,
            )
        q.preprocessing = dict(backbone.preprocessing, backend=backend)
        return q
    path = model_file(
        backbone,
        backend,
        model_digest=model_digest,
        store=store,
        calibration=calibration,
        calibration_id=calibration_id,
    )
    if backend in OPENVINO:
        from tlops.features.backends_openvino import OpenVinoBackbone

        return OpenVinoBackbone(backbone, path, backend)
    return OnnxBackbone(backbone, path, backend)
