"""Metrics, calibration, confusion matrices and the gate decision."""
