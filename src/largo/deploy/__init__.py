"""Deploy stage: bundles on disk and the Predictor that turns raw records into outputs."""
