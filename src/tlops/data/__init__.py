"""Reading raw data (image folders, NPZ, CSV/TSV text, built-ins) and splitting it."""
