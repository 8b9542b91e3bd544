"""Explain: a traced run of the detector on one image (``trace``) and its figures (``figures``)."""
