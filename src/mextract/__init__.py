"""mextract: reproducible model-extraction experiments on image classifiers."""

__version__ = "0.1.0"
