"""Runners that execute the DAG: in-process (``local``)."""
