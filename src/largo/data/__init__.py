"""Data stage: readers, cleaning, splits, features, loaders."""
