"""Kept for imports from older code: the checkpoint vocabulary lives in litgpt_ext.train.checkpoint."""

from litgpt_ext.train.checkpoint import STEP_RE, checkpoint_step  # noqa: F401
