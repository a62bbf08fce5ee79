"""mextract: model-extraction attacks and defences on image classifiers."""

import os

# Idle OpenMP threads sleep instead of spinning, so host-side work between training
# steps is not starved on a small CPU (docs/performance.md, "OpenMP on a busy machine").
# Set here, before any submodule imports torch; a value already set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
