"""Model bundles (backbone + optional head), loading from hf/timm/mlflow/local sources."""
