"""What ``edgeship demo`` needs, shipped inside the package so the demo runs from a wheel (#16).

* :mod:`edgeship.demo_data.model` — the digits teacher and student, the fixed
  train / calibration / eval split of scikit-learn's bundled 8x8 digits
  (nothing is downloaded), a plain training loop. The recipes name the
  student by this file's path (``.../demo_data/model.py:Student``).
* :mod:`edgeship.demo_data.prepare` — writes the data splits, the trained
  teacher (torch + ONNX) and a development signing key.

``examples/digits`` uses the same two modules. Both import torch only inside
their functions.
"""
