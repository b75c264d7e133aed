"""Evaluation suites: fixed protocols that turn a model and its compressors into one table and plot
(`python -m kvjax.evaluate --suite NAME`)."""
