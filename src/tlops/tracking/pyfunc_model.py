"""MLflow "models from code" entry: logged as the model's code, so no pickled object is stored."""

from mlflow.models import set_model

from tlops.tracking.pyfunc import TlopsClassifier

set_model(TlopsClassifier())
