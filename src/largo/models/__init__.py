"""Model stage: shared layers, one file per model family, heads, the zoo and the builder."""
