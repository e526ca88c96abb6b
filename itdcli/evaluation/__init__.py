"""The evaluation of I-MMSE estimators: the engine that records per-cell errors, the estimator units that turn
them into bounds, and the pilot and rounds that reach a target error (docs/math.md)."""
