"""The MLflow pyfunc wrapper: raw inputs in, labels and probabilities out.

Inputs: text models take a DataFrame with a ``text`` column (or any single string column),
or a list of strings. Image models take a uint8 array (N,H,W) or (N,H,W,C); the unwrapped
model (``.unwrap_python_model().predict(None, paths)``) also takes image file paths.
Output: a DataFrame with ``label``, ``score`` and one ``prob_<class>`` column per class.
"""

from __future__ import annotations

import warnings
from typing import Any

import mlflow.pyfunc
import numpy as np


def _to_inputs(model_input: Any, modality: str) -> Any:
    import pandas as pd

    if modality == "text":
        if isinstance(model_input, pd.DataFrame):
            col = "text" if "text" in model_input.columns else model_input.columns[0]
            return model_input[col].astype(str).tolist()
        if isinstance(model_input, (pd.Series, np.ndarray)):
            return [str(v) for v in model_input.tolist()]
        return [str(v) for v in model_input]
    if isinstance(model_input, pd.DataFrame):
        model_input = model_input.iloc[:, 0].tolist()
    if isinstance(model_input, (list, tuple)) and model_input and isinstance(model_input[0], str):
        return load_images(model_input)
    return np.asarray(model_input)


def load_images(paths: list[str]) -> np.ndarray:
    from PIL import Image

    arrays = []
    for p in paths:
        with Image.open(p) as im:
            arrays.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    return np.stack(arrays)


# MLflow nags about predict() type hints; the signature is logged explicitly instead.
warnings.filterwarnings("ignore", message=".*type hint", category=UserWarning)


class TlopsClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from tlops.models.bundle import load_classifier

        self.clf = load_classifier(context.artifacts["bundle"])

    def predict(self, context, model_input, params=None):
        return predict_frame(self.clf, _to_inputs(model_input, self.clf.backbone.modality))


def predict_frame(clf: Any, x: Any) -> Any:
    import pandas as pd

    probs = clf.predict_proba(x)
    df = pd.DataFrame({"label": [clf.classes[i] for i in probs.argmax(1)], "score": probs.max(1).astype(float)})
    for i, c in enumerate(clf.classes):
        df[f"prob_{c}"] = probs[:, i].astype(float)
    return df
