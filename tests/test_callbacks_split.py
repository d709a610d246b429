"""The instantiable ``callbacks`` and ``logger`` config groups, and the held-out test split."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from conftest import FAST
from test_data import write_cifar, write_image_folder
from tokred import config as config_mod
from tokred.config import ConfigError, compose_config
from tokred.data import build_datamodule
from tokred.export import load_deployable
from tokred.training.callbacks import build_callbacks
from tokred.training.loggers import RunCSVLogger, build_logger
from tokred.training.phases import InterruptCheckpoint, checkpoint_callbacks
from tokred.training.run import build_model, evaluate, train

FAST_TRAINER = [o for o in FAST if not o.startswith("dataset.")]
NO_MAPS = "visualize.every_n_epochs=0"


def _describe(callbacks) -> list[tuple]:
    """What tells two callback lists apart: class, file name, monitor, schedule, directory / path, refresh rate."""
    return [
        (
            type(c),
            getattr(c, "filename", None),
            getattr(c, "monitor", None),
            getattr(c, "_every_n_train_steps", None),
            getattr(c, "_every_n_epochs", None),
            str(getattr(c, "dirpath", None) or getattr(c, "path", "")),
            getattr(c, "refresh_rate", None),
        )
        for c in callbacks
    ]


# ------------------------------------------------------------------------------------------------ callbacks, logger
def test_the_default_groups_build_what_training_used_before(tmp_path):
    cfg = compose_config(["checkpoint.every_n_train_steps=7"])
    phase_dir = tmp_path / "checkpoints/train"
    built = build_callbacks(cfg.callbacks, phase_dir)
    # Before: tokred's checkpoints of the phase directory, then a tqdm bar refreshing every 10 batches.
    assert _describe(built) == _describe([*checkpoint_callbacks(phase_dir, 7), TQDMProgressBar(refresh_rate=10)])
    assert isinstance(built[2], InterruptCheckpoint) and built[2].path == phase_dir / "last.ckpt"
    assert [type(c) for c in build_callbacks(cfg.callbacks)] == [TQDMProgressBar], "an evaluation has no checkpoints"
    assert build_callbacks(compose_config(["callbacks=none"]).callbacks, phase_dir) == []
    assert build_callbacks(compose_config(["~callbacks"]).get("callbacks"), phase_dir) == []

    logger = build_logger(cfg.logger, tmp_path)  # the default, wandb (offline in tests)
    assert type(logger).__name__ == "RunWandbLogger" and logger._wandb_init["name"] == "none-deit_tiny_cpu-synthetic"
    assert logger._wandb_init["group"] == "default" and logger._id == (tmp_path / "wandb_run_id").read_text().strip()
    csv_logger = build_logger(compose_config(["logger=csv"]).logger, tmp_path)
    assert type(csv_logger) is RunCSVLogger and Path(csv_logger.log_dir) == tmp_path / "csv"
    assert build_logger(compose_config(["~logger"]).get("logger"), tmp_path) is None


@pytest.fixture
def conf_with_user_files(tmp_path, monkeypatch) -> Path:
    """A copy of conf/ with a callback and a logger that exist only as YAML files (no tokred code)."""
    conf = tmp_path / "conf"
    shutil.copytree(config_mod.conf_dir(), conf)
    # A second ModelCheckpoint of the user's, into each phase's directory (_partial_: completed with it).
    (conf / "callbacks/top_acc5.yaml").write_text(
        "top_acc5:\n  _target_: lightning.pytorch.callbacks.ModelCheckpoint\n  _partial_: true\n"
        "  filename: top_acc5\n  monitor: val/acc5\n  mode: max\n  enable_version_counter: false\n"
    )
    # Lightning's own CSVLogger, which knows nothing of phases.
    (conf / "logger/plain_csv.yaml").write_text(
        "_target_: lightning.pytorch.loggers.CSVLogger\nname: plain\nversion: ''\n"
    )
    monkeypatch.setattr(config_mod, "conf_dir", lambda: conf)
    return conf


def test_presets_and_yaml_only_additions_take_part_in_training(conf_with_user_files, tmp_path):
    overrides = [
        *FAST,
        NO_MAPS,
        f"paths.root={tmp_path}",
        "trainer.max_epochs=3",
        "logger=plain_csv",
        "callbacks=[default,early_stopping,lr_monitor,throughput_monitor,top_acc5]",
        # No validation improves on the one before by 2: the fit stops after its second epoch, not its third.
        "callbacks.early_stopping.patience=1",
        "callbacks.early_stopping.min_delta=2",
        "+callbacks.throughput_monitor.window_size=2",  # a rate from every 2 steps (Lightning's default: 100)
    ]
    cfg = compose_config(overrides)
    cfg.paths.output_dir = str(tmp_path / "run")
    summary = train(cfg)
    run_dir = Path(summary["run_dir"])
    assert summary["global_step"] == 4, "early stopping ended the fit after 2 of 3 epochs (2 steps each)"
    assert (run_dir / "checkpoints/train/top_acc5.ckpt").is_file(), "the user's checkpoint went to the phase directory"
    assert (run_dir / "checkpoints/train/best.ckpt").is_file() and summary["val/acc1_best"] is not None
    rows = list(csv.DictReader((run_dir / "plain/metrics.csv").open()))
    columns = set(rows[0])
    assert any(c.startswith("lr-AdamW") for c in columns), columns
    assert "train/device/samples_per_sec" in columns, columns
    assert max(int(float(r["train/samples"])) for r in rows if r["train/samples"]) == 4 * 16, "images of 4 steps"
    assert summary["logs"].startswith("CSVLogger logs:")
    # checkpoint.* may change on a resume, although the checkpoints entry of callbacks copies it.
    resumed = compose_config([*overrides, "checkpoint.every_n_train_steps=1", f"ckpt_path={run_dir}"])
    resumed.paths.output_dir = str(tmp_path / "elsewhere")
    again = train(resumed)
    assert again["global_step"] == 4 and again["run_dir"] == str(run_dir)


def test_a_plain_lightning_logger_keeps_one_step_axis_across_phases(conf_with_user_files, tmp_path):
    logger = build_logger(compose_config(["logger=plain_csv"]).logger, tmp_path)
    assert isinstance(logger, CSVLogger) and type(logger).__name__ == "CSVLogger"
    logger.log_metrics({"train/loss": 1.0}, step=3)  # phase 1, its step 3
    logger.step_offset = 4  # phase 1 had 4 steps
    logger.log_metrics({"train/loss": 0.5}, step=1)
    logger.finish({})
    rows = list(csv.DictReader((tmp_path / "plain/metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [3, 5]


@pytest.mark.parametrize(
    "override, package",
    [
        ("callbacks=[default,rich_progress_bar]", "rich"),
        ("logger=tensorboard", "tensorboard"),
        ("logger=mlflow", "mlflow"),
    ],
)
def test_a_preset_whose_package_is_missing_names_the_pip_install(override, package, tmp_path):
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed")
    cfg = compose_config([override])
    with pytest.raises(ConfigError) as err:
        build_callbacks(cfg.callbacks, tmp_path)
        build_logger(cfg.logger, tmp_path)
    message = str(err.value)
    assert (
        "\n" not in message and "not installed" in message and f"pip install -U {package}" in message.replace("'", "")
    )


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["+callbacks.mine._target_=no.such.Callback"], "callbacks.mine._target_ cannot be imported"),
        (
            ["callbacks=[default,early_stopping]", "+callbacks.early_stopping.patients=3"],
            "callbacks.early_stopping cannot be built (TypeError",
        ),
        (["+callbacks.mine.monitor=val/acc1"], "callbacks.mine has no _target_"),
        (["+callbacks.mine._target_=torch.nn.Identity"], "not a Lightning Callback"),
        (["logger._target_=torch.nn.Identity"], "is not a Lightning Logger class"),
        (["logger=wandb", "logger.mode=sometimes"], "logger.mode='sometimes'; choose one of"),
    ],
)
def test_a_bad_entry_is_one_line_naming_it(overrides, fragment, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    cfg = compose_config(overrides)
    with pytest.raises(ConfigError) as err:
        build_callbacks(cfg.callbacks, tmp_path)
        build_logger(cfg.logger, tmp_path)
    assert "\n" not in str(err.value) and fragment in str(err.value)


# ------------------------------------------------------------------------------------------------ test split
def _accuracy(model: torch.nn.Module, dataset) -> float:
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    labels = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    with torch.no_grad():
        return (model(images).argmax(1) == labels).float().mean().item()


def test_the_summary_reports_the_final_model_on_the_held_out_test_split(run_cfg):
    cfg = run_cfg(NO_MAPS, "dataset.test_size=48")
    summary = train(cfg)
    run_dir = Path(summary["run_dir"])
    test_set = build_datamodule(cfg.dataset).test_set
    assert len(test_set) == 48
    assert summary["test/acc1"] == pytest.approx(_accuracy(load_deployable(run_dir / "export"), test_set))
    assert 0 <= summary["test/acc1"] <= summary["test/acc5"] <= 1
    final = list(csv.DictReader((run_dir / "csv/metrics.csv").open()))[-1]
    assert float(final["test/acc1"]) == pytest.approx(summary["test/acc1"]) and final["val/acc1"], (
        "the final evaluation is one row with both splits"
    )


def test_synthetic_splits_are_disjoint():
    dm = build_datamodule(compose_config(["dataset.train_size=200", "dataset.val_size=100"]).dataset)
    assert len(dm.test_set) == 100, "the test split is as large as validation by default"
    seen = {
        split: {image.tobytes() for image in data.images}
        for split, data in (("train", dm.train_set), ("val", dm.val_set), ("test", dm.test_set))
    }
    assert not seen["test"] & seen["val"] and not seen["test"] & seen["train"] and not seen["val"] & seen["train"]
    assert build_datamodule(compose_config(["dataset.test_size=0"]).dataset).test_set is None


def test_cifar_validates_on_held_out_training_images_and_tests_on_the_test_batch(tmp_path):
    root = write_cifar(tmp_path, per_batch=6)  # 30 training images, 6 in the test batch
    cfg = compose_config(
        ["dataset=cifar10", f"dataset.root={root}", "dataset.verify=false", "dataset.val_size=8"]
    ).dataset
    dm, again = build_datamodule(cfg), build_datamodule(cfg)
    train_rows = {row.tobytes() for row in dm.train_set.data}
    val_rows = {row.tobytes() for row in dm.val_set.data}
    assert len(dm.train_set) == 22 and len(dm.val_set) == 8 and not train_rows & val_rows
    official = build_datamodule(
        compose_config(
            ["dataset=cifar10", f"dataset.root={root}", "dataset.verify=false", "dataset.val_size=29"]
        ).dataset
    )
    assert len(train_rows | val_rows) == 30 and len(official.test_set) == 6
    assert np.array_equal(dm.val_set.data, again.val_set.data), "every run validates on the same images"
    test_rows = {row.tobytes() for row in dm.test_set.data}
    assert [y for _, y in dm.test_set] == [i % 10 for i in range(30, 36)] and not test_rows & (train_rows | val_rows)
    assert not torch.equal(dm.train_set[0][0], dm.train_set[0][0]) and torch.equal(dm.val_set[0][0], dm.val_set[0][0])
    too_many = build_datamodule(
        compose_config(
            ["dataset=cifar10", f"dataset.root={root}", "dataset.verify=false", "dataset.val_size=30"]
        ).dataset
    )
    with pytest.raises(Exception, match="dataset.val_size=30: CIFAR-10 holds 30 training images"):
        too_many.num_classes


def _folder_overrides(root: Path, tmp_path: Path) -> list[str]:
    return [
        *FAST_TRAINER,
        NO_MAPS,
        "dataset=imagefolder",
        f"dataset.root={root}",
        "dataset.num_workers=0",
        "dataset.batch_size=4",
        "dataset.aug.mixup=0",
        "dataset.aug.cutmix=0",
        "dataset.aug.auto_augment=null",
        f"paths.root={tmp_path}",
    ]


def test_an_image_folder_tests_on_its_test_folder(tmp_path):
    root = write_image_folder(tmp_path / "data", {"ant": 3, "bee": 3}, {"ant": 2, "bee": 2})
    rng = np.random.default_rng(1)
    for cls, n in (("bee", 3),):  # test/ may lack a class; indices follow train/
        (root / "test" / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / "test" / cls / f"t{i}.png")
    cfg = compose_config(_folder_overrides(root, tmp_path))
    dm = build_datamodule(cfg.dataset)
    assert [y for _, y in dm.test_set.samples] == [1, 1, 1]
    assert not {p for p, _ in dm.test_set.samples} & {p for p, _ in dm.val_set.samples}
    model = build_model(cfg, dm.num_classes).eval()
    metrics = evaluate(model, dm, cfg, tmp_path / "eval")
    assert metrics["test/acc1"] == pytest.approx(_accuracy(model, dm.test_set))
    assert metrics["val/acc1"] == pytest.approx(_accuracy(model, dm.val_set))


def test_without_a_test_split_the_summary_says_so(tmp_path, caplog):
    root = write_image_folder(tmp_path / "data", {"ant": 4, "bee": 4}, {"ant": 2, "bee": 2})
    cfg = compose_config([*_folder_overrides(root, tmp_path), "trainer.max_epochs=1"])
    cfg.paths.output_dir = str(tmp_path / "run")
    with caplog.at_level(logging.INFO, logger="tokred"):
        summary = train(cfg)
    assert summary["test/acc1"] is None and summary["test/acc5"] is None and summary["val/acc1"] is not None
    assert json.loads((tmp_path / "run/summary.json").read_text())["test/acc1"] is None
    assert any("has no test split" in r.getMessage() for r in caplog.records if r.name == "tokred")
