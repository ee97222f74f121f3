"""litgpt_ext: midtraining research code in the litgpt mould."""

__version__ = "0.1.0"
