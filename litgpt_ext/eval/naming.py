"""Kept for imports from older code: the checkpoint vocabulary lives in litgpt_ext.checkpoint."""

from litgpt_ext.checkpoint import STEP_RE, checkpoint_step  # noqa: F401
