"""The digits models: Teacher, Student, the fixed split, a plain training loop.

They ship inside edgeship (``edgeship.demo_data.model``) so that
``edgeship demo`` runs from a wheel; this file names them for the recipe
(``factory = "model.py:Student"``) and for code that imports ``model``.
"""
from edgeship.demo_data.model import (  # noqa: F401 - re-exported
    LABELS,
    PREPROCESS,
    Student,
    Teacher,
    count_params,
    load_digits_split,
    train_classifier,
)

__all__ = ["load_digits_split", "Teacher", "Student", "train_classifier", "count_params", "PREPROCESS", "LABELS"]
