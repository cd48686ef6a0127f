"""The trained detector in use: the HTTP service (`serve`) and batch scoring (`score`),
one Predictor and one decoder for both."""
