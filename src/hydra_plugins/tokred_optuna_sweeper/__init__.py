"""A Hydra sweeper on the current Optuna API: multi-objective search that reports the Pareto front.

Lives in the ``hydra_plugins`` namespace so Hydra's plugin discovery lists it; selected with
``hydra/sweeper=optuna`` (``conf/hydra/sweeper/optuna.yaml``).
"""
