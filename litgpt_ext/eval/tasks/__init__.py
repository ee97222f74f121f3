"""lm-eval task YAMLs for the offline demo tasks (a package so pip installs local_data.py too)."""
