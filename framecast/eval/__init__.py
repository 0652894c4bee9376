"""Evaluation: checks and (later) metrics computed from the toys' known generative process."""
