"""The comparison: ``tokred-benchmark`` (cost and speed of every reducer), ``tokred-report`` (accuracy of trained
runs vs cost and speed, Pareto plots) and ``tokred-compare`` (the training sweep that feeds the report)."""
