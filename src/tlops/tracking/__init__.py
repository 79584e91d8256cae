"""MLflow tracking and registry: embedded sqlite default, pyfunc packaging, aliases."""
