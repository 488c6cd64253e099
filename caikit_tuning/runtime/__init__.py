"""Serving glue: the launcher, the model-id and path guards, the training worker pool."""
