"""Inference for users: the ``Detector`` API and ``fasterrcnn predict``'s run over files."""
