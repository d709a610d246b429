"""Optuna sweeper: trials are Hydra jobs, objectives are keys of the job's returned summary.

hydra-optuna-sweeper pins optuna<3 (hydra#2562); this one uses the ask/tell API of optuna 4/5. A trial's job returns
tokred-train's summary dict and each objective names one of its keys (``val/acc1: maximize``,
``model/gmacs: minimize``). The study lives in a journal file in the sweep directory, so a re-launched search
continues where it stopped: trials left running by an interrupted launch are re-run with the same overrides (whose
job directories resume from their checkpoints), finished trials count towards ``n_trials``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep, Transformer
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

DIRECTIONS = ("maximize", "minimize")
SAMPLERS = {
    "nsga2": optuna.samplers.NSGAIISampler,
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
}


def distribution(override: Override) -> optuna.distributions.BaseDistribution:
    """The Optuna distribution of a sweep override: ``choice(...)`` and ``range(...)`` are categorical over their
    values (encoded as override strings), ``interval(a, b)`` is a float or, with int bounds, an int range;
    ``tag(log, interval(...))`` samples it log-uniformly."""
    value = override.value()
    if isinstance(value, (ChoiceSweep, RangeSweep)):
        return optuna.distributions.CategoricalDistribution(list(override.sweep_iterator(Transformer.encode)))
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return optuna.distributions.IntDistribution(value.start, value.end, log=log_scale)
        return optuna.distributions.FloatDistribution(value.start, value.end, log=log_scale)
    raise ValueError(f"{override.input_line}: the optuna sweeper takes choice(), range() or interval() sweeps")


def objective_values(ret: JobReturn, objectives: Sequence[str]) -> list[float] | None:
    """The objectives from a finished job's returned mapping; None when the job failed or a value is missing/NaN."""
    if ret.status != JobStatus.COMPLETED or not isinstance(ret.return_value, Mapping):
        return None
    values = [ret.return_value.get(key) for key in objectives]
    if any(v is None or not math.isfinite(float(v)) for v in values):
        return None
    return [float(v) for v in values]


class OptunaSweeper(Sweeper):
    """Multi-objective Optuna search; writes the Pareto front (``study.best_trials``) to ``<sweep dir>/pareto.json``."""

    def __init__(
        self,
        objectives: Mapping[str, str],
        n_trials: int,
        n_jobs: int,
        sampler: str,
        seed: int | None,
        study_name: str,
        storage: str | None,
        params: Mapping[str, str] | None,
    ) -> None:
        bad = {k: v for k, v in objectives.items() if v not in DIRECTIONS}
        if not objectives or bad:
            raise ValueError(f"hydra.sweeper.objectives needs <summary key>: maximize|minimize entries, got {bad}")
        if sampler not in SAMPLERS:
            raise ValueError(f"hydra.sweeper.sampler={sampler!r}; choose one of: {', '.join(SAMPLERS)}")
        self.objectives = dict(objectives)
        self.n_trials, self.n_jobs = int(n_trials), max(1, int(n_jobs))
        self.sampler, self.seed = sampler, seed
        self.study_name, self.storage = study_name, storage
        self.params = dict(params or {})

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def _study(self, sweep_dir: Path) -> optuna.Study:
        storage = self.storage or optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(sweep_dir / "optuna.journal"))
        )
        return optuna.create_study(
            study_name=self.study_name,
            storage=storage,
            load_if_exists=True,
            directions=list(self.objectives.values()),
            sampler=SAMPLERS[self.sampler](seed=self.seed),
        )

    @staticmethod
    def _requeue_interrupted(study: optuna.Study) -> None:
        """Trials a killed launch left RUNNING: mark them failed and enqueue their parameters again, so their
        deterministic job directories are reused and resume from their last checkpoints."""
        for trial in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
            study.enqueue_trial(trial.params, skip_if_exists=False)
            log.info("trial %d was interrupted: re-running it (%s)", trial.number, trial.params)

    def sweep(self, arguments: list[str]) -> list[dict[str, Any]]:
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides([f"{k}={v}" for k, v in self.params.items()] + list(arguments))
        space = {o.get_key_element(): distribution(o) for o in overrides if o.is_sweep_override()}
        fixed = [
            f"{o.get_key_element()}={o.get_value_element_as_str()}" for o in overrides if not o.is_sweep_override()
        ]
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")

        study = self._study(sweep_dir)
        self._requeue_interrupted(study)
        job_idx = len(study.trials)
        # Failed trials use up this launch's budget too, so a job that always fails cannot loop forever.
        remaining = self.n_trials - len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))
        while remaining > 0:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, remaining))]
            batch = [fixed + [f"{key}={trial.params[key]}" for key in space] for trial in trials]
            for trial, ret in zip(trials, self.launcher.launch(batch, initial_job_idx=job_idx)):
                values = objective_values(ret, list(self.objectives))
                if values is None:
                    log.warning(
                        "trial %d failed or returned no %s: %s",
                        trial.number,
                        list(self.objectives),
                        ret.return_value if ret.status == JobStatus.FAILED else "missing values",
                    )
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                else:
                    trial.set_user_attr("run_dir", str(ret.return_value.get("run_dir", ret.working_dir)))
                    study.tell(trial, values)
            job_idx += len(trials)
            remaining -= len(trials)
        return self._write_front(study, sweep_dir)

    def _write_front(self, study: optuna.Study, sweep_dir: Path) -> list[dict[str, Any]]:
        front = [
            {
                "trial": t.number,
                "values": dict(zip(self.objectives, t.values)),
                "params": t.params,
                "run_dir": t.user_attrs.get("run_dir"),
            }
            for t in study.best_trials
        ]
        front.sort(key=lambda row: row["values"][next(iter(self.objectives))])
        (sweep_dir / "pareto.json").write_text(
            json.dumps({"objectives": self.objectives, "n_trials": len(study.trials), "front": front}, indent=2)
        )
        log.info(
            "Pareto front (%d of %d trials), written to %s:", len(front), len(study.trials), sweep_dir / "pareto.json"
        )
        for row in front:
            log.info("  trial %d: %s  %s", row["trial"], row["values"], row["params"])
        return front
