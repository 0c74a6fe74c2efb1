"""The data layer: schemas, image references, validation, inlining. Knows nothing of models."""
