"""The OpenVINO extraction backends (``features.backend: openvino | openvino-bf16 | openvino-int8``).

All start from the ONNX file the ``onnx`` backend exports (one export per model, pooling and L2
normalisation inside the graph, batch and sequence axes dynamic), so the three runtimes run the
same graph:

- ``openvino``: ``openvino.convert_model`` of that file, saved as OpenVINO IR with fp32 weights
  (``compress_to_fp16=False``) and compiled with ``INFERENCE_PRECISION_HINT: f32``: on CPUs with
  AMX-BF16 the CPU plugin otherwise runs fp32 models in bf16, and the features would no longer equal
  PyTorch's.
- ``openvino-bf16``: the same fp32 IR file compiled with ``INFERENCE_PRECISION_HINT: bf16``: matrix
  products in bfloat16 (8 mantissa bits) with fp32 accumulation, on the CPU's own bf16 instructions
  (AMX or AVX512-BF16). Offered only where the CPU plugin reports native bf16
  (``OPTIMIZATION_CAPABILITIES``); elsewhere it would emulate it, slower than fp32.
- ``openvino-int8``: NNCF post-training quantisation (``nncf.quantize``: int8 weights and
  activations, ranges from min/max statistics) of the fp32 IR, calibrated on the run's own inputs
  (the seeded train sample the image ``onnx-int8`` path uses; for text those sentences tokenised as
  extraction tokenises them), with ``ModelType.TRANSFORMER`` for text (NNCF's recipe for
  transformers: mixed preset, attention-aware ignored patterns). Operations NNCF leaves in float run
  in fp32, as above.

openvino and nncf are an optional extra (``pip install 'tlops[openvino]'``): asking for these
backends without them is a :class:`~tlops.errors.ConfigError` naming the install command, and
``auto`` leaves them out (:func:`tlops.features.backends.available`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from tlops.errors import ConfigError
from tlops.features import signal_stack
from tlops.features.exported import ExportedBackbone

log = logging.getLogger(__name__)

INSTALL = (
    "pip install 'tlops[openvino]' (in a checkout: make install, or "
    ".venv/bin/python -m pip install -c requirements.lock -e '.[openvino]')"
)


# the CPU plugin's inference precision per backend (the int8 model's float operations stay fp32)
PRECISION = {"openvino": "f32", "openvino-bf16": "bf16", "openvino-int8": "f32"}


def packages(backend: str) -> tuple[str, ...]:
    """The optional packages a backend imports."""
    return ("openvino", "nncf") if backend == "openvino-int8" else ("openvino",)


def installed(backend: str) -> bool:
    return all(importlib.util.find_spec(p) is not None for p in packages(backend))


def usable(backend: str) -> bool:
    """Installed, and for ``openvino-bf16`` a CPU with native bf16 (what ``auto`` may try)."""
    return installed(backend) and (backend != "openvino-bf16" or native_bf16())


@functools.lru_cache(maxsize=1)
def native_bf16() -> bool:
    """Whether OpenVINO's CPU plugin runs bf16 on this CPU's own instructions (AMX-BF16 or AVX512-BF16)."""
    import openvino as ov

    with signal_stack.kept():
        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def require(backend: str) -> None:
    """Refuse an OpenVINO backend whose packages are missing, naming the install command, or
    ``openvino-bf16`` on a CPU without native bf16."""
    missing = [p for p in packages(backend) if importlib.util.find_spec(p) is None]
    if missing:
        raise ConfigError(f"features.backend {backend!r} needs the optional package(s) {', '.join(missing)}: {INSTALL}")
    if backend == "openvino-bf16" and not native_bf16():
        raise ConfigError(
            "features.backend 'openvino-bf16': this CPU has no native bf16 (OpenVINO's CPU plugin lists no BF16 "
            "capability; it needs AMX-BF16 or AVX512-BF16), so bf16 would be emulated and slower than fp32; "
            "use openvino or openvino-int8"
        )


def versions(backend: str) -> dict[str, str]:
    """The versions that shape the IR file (part of its store key)."""
    from importlib.metadata import version

    return {p: version(p) for p in packages(backend)}


def convert(onnx_path: Path, dst: Path) -> None:
    """The fp32 ONNX file as fp32 OpenVINO IR (``dst`` is the ``.xml``; the ``.bin`` lies next to it)."""
    require("openvino")
    import openvino as ov

    root = logging.getLogger()
    state = root.level, list(root.filters), list(root.handlers)
    try:
        model = ov.convert_model(str(onnx_path))
    except Exception as e:  # OpConversionFailure and friends: a model the frontend cannot express
        first = str(e).strip().splitlines()
        raise ConfigError(
            "features.backend openvino: OpenVINO cannot convert this model "
            f"({' '.join(first[-6:])[:600]}); use features.backend onnx or onnx-int8"
        ) from e
    finally:  # convert_model sets the root logger to ERROR and restores it only when it succeeds (2026.4)
        root.setLevel(state[0])
        root.filters, root.handlers = state[1], state[2]
    ov.save_model(model, str(dst), compress_to_fp16=False)


def quantize(fp32_xml: Path, dst: Path, modality: str, calibration: Sequence[dict[str, np.ndarray]]) -> None:
    """NNCF post-training int8 quantisation of the fp32 IR on ``calibration`` (feed dicts, one per batch)."""
    require("openvino-int8")
    if not calibration:
        raise ConfigError("features.backend openvino-int8 needs calibration inputs (the run's train split)")
    import nncf
    import openvino as ov

    nncf.set_log_level(logging.WARNING)
    model = ov.Core().read_model(str(fp32_xml))
    kwargs: dict[str, Any] = {"model_type": nncf.ModelType.TRANSFORMER} if modality == "text" else {}
    # NNCF compiles the model to collect statistics; its rich progress bar goes to stderr with tlops' own
    # progress, not to stdout (the CLI's output and the KFP task's result stream)
    with signal_stack.kept(), contextlib.redirect_stdout(sys.stderr):
        q = nncf.quantize(model, nncf.Dataset(list(calibration)), subset_size=len(calibration), **kwargs)
    ov.save_model(q, str(dst), compress_to_fp16=False)


def write(dst_dir: Path, tmp: Path) -> None:
    """Move ``tmp/model.{bin,xml}`` into ``dst_dir``: the weights first, so a ``model.xml`` there is complete."""
    os.replace(tmp / "model.bin", dst_dir / "model.bin")
    os.replace(tmp / "model.xml", dst_dir / "model.xml")


# text batches are padded to a multiple of this many tokens (see OpenVinoBackbone.forward)
SEQ_MULTIPLE = 8


class OpenVinoBackbone(ExportedBackbone):
    """A compiled OpenVINO model behind the backbone interface ``extract`` uses. One infer request,
    torch's thread count, one stream (extraction feeds one batch at a time).

    Text batches come dynamically padded to their longest sentence, so nearly every batch has a new
    sequence length, and the CPU plugin prepares its kernels for each new input shape the first time
    it sees it: a single pass over a dataset (what extraction is) paid that on almost every batch.
    Padding the sequence axis to a multiple of ``SEQ_MULTIPLE`` with a zero attention mask leaves a
    few distinct shapes and does not change the features (the padding is masked out of attention
    and pooling); ``bench/perf_backends.py`` measures the result."""

    def __init__(self, backbone: nn.Module, path: Path, backend: str):
        require(backend)
        super().__init__(backbone, path, backend)
        import openvino as ov

        config = {
            "INFERENCE_NUM_THREADS": max(1, torch.get_num_threads()),
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",
            # openvino: f32, not the plugin's bf16 default on AMX CPUs, so fp32 features equal PyTorch's
            "INFERENCE_PRECISION_HINT": PRECISION[backend],
        }
        with signal_stack.kept():  # else a later Ctrl-C can segfault (tlops.features.signal_stack)
            self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self._request = self.compiled.create_infer_request()
        self._inputs = [i.get_any_name() for i in self.compiled.inputs]

    def forward(self, **tensors: torch.Tensor) -> torch.Tensor:
        if self.modality == "text":
            tensors = _pad_sequence(tensors, SEQ_MULTIPLE)
        feeds = {k: tensors[k].cpu().numpy() for k in self._inputs}
        out = self._request.infer(feeds)[0]
        return torch.from_numpy(np.array(out, copy=True))  # the request reuses its output buffer


def _pad_sequence(tensors: dict[str, torch.Tensor], multiple: int) -> dict[str, torch.Tensor]:
    """Token inputs (batch x sequence) padded with zeros to a sequence length that is a multiple of
    ``multiple``; a zero attention mask keeps the padding out of attention and pooling."""
    length = next(iter(tensors.values())).shape[-1]
    extra = -length % multiple
    if not extra:
        return tensors
    return {k: torch.nn.functional.pad(v, (0, extra)) if v.dim() == 2 else v for k, v in tensors.items()}
