"""Pipeline tests: put examples/ (the ``segkd_examples`` package) and this folder (test helpers) on ``sys.path``."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "examples"))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
