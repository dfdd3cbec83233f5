"""Loaded by every pytest run in this repository, notebooks alone included
(pytest notebooks/02_pruning.ipynb).

Claims are strict under pytest: a notebook (nbval's kernels inherit the environment) or a test
whose claim misses fails the run, as an assert would; a learner's session shows a note instead
(labkit/claims.py).
"""
import os

os.environ["LABKIT_STRICT"] = "1"
