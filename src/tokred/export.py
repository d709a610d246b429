"""Standalone deployable checkpoints: ``config.json`` + ``model.safetensors``; and ONNX graphs of deployable models.

The directory holds everything needed to rebuild the deployable model (backbone config, reducer config and
searched structure) and its tensors in safetensors, so loading it never unpickles anything and needs no training code
or teacher.

:func:`export_onnx` writes a model as one self-contained ONNX file (input ``images`` (B, 3, H, W) float32, any batch
size; output ``logits``), :func:`onnx_session` runs one in onnxruntime; both need ``pip install 'tokred[onnx]'``.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tokred.backbones import CheckpointError, create_backbone
from tokred.io import atomic_write, atomic_write_json
from tokred.reducers.base import TokenReducer

FORMAT_VERSION = 1


def save_deployable(model: TokenReducer, directory: Path, cfg: Mapping[str, Any]) -> Path:
    """Write ``model.deployable()`` to ``directory``; files are replaced atomically."""
    deploy = model.deployable()
    config = {
        "format_version": FORMAT_VERSION,
        "backbone": {**cfg["backbone"], "pretrained": False, "checkpoint": None},
        "reducer": cfg["reducer"],
        "num_classes": deploy.vit.num_classes,
        "structure": deploy.structure(),
    }
    tensors = {k: v.detach().contiguous().cpu() for k, v in deploy.state_dict().items()}
    atomic_write(directory / "model.safetensors", lambda p: save_file(tensors, str(p)))
    atomic_write_json(directory / "config.json", config)
    return directory


def load_deployable(directory: str | Path) -> nn.Module:
    """Rebuild an exported model in eval mode."""
    from tokred.reducers import create_reducer  # the registry imports every reducer; only needed here

    directory = Path(directory)
    config_path, weights_path = directory / "config.json", directory / "model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise CheckpointError(
            f"{str(directory)!r} is not an exported tokred model (needs config.json and "
            "model.safetensors; export one with tokred-train, it writes <run_dir>/export)"
        )
    config = json.loads(config_path.read_text())
    vit = create_backbone(config["backbone"], config["num_classes"])
    model = create_reducer(config["reducer"], vit)
    model.load_structure(config["structure"])
    deploy = model.deployable()
    try:
        deploy.load_state_dict(load_file(str(weights_path)))
    except RuntimeError as err:
        raise CheckpointError(
            f"{str(weights_path)!r} does not match its config.json ({str(err).splitlines()[0]})"
        ) from None
    return deploy.eval()


class OnnxExportError(ValueError):
    """A model that cannot be exported to (or run in) ONNX here; the message names why and the fix."""


def _require_onnx(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise OnnxExportError(f"ONNX export needs {', '.join(missing)}: pip install 'tokred[onnx]'")
    # torch.export's exporter (dynamo=True) with custom translations; torch 2.4's export has neither keyword.
    if not {"dynamo", "custom_translation_table"} <= set(inspect.signature(torch.onnx.export).parameters):
        raise OnnxExportError(f"ONNX export needs torch>=2.6, this is torch {torch.__version__} (pip install -U torch)")


def _stable_sort(self: Any, dim: int = -1, descending: bool = False, stable: bool | None = None) -> tuple[Any, Any]:
    """``aten.sort.stable`` (ToMe's) in ONNX, which has no sort: TopK over the whole axis breaks ties by the
    lower index, as the ONNX spec requires, so it is stable in either direction."""
    from onnxscript import opset18 as op

    size = op.Gather(op.Shape(self), op.Constant(value_ints=[dim]))
    return op.TopK(self, size, axis=dim, largest=descending, sorted=True)


def _data_dependent_call(err: BaseException) -> str | None:
    """Where in tokred a failed export met a shape that depends on the input's values ("file:line in function"), or
    None when that is not why it failed."""
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    package = str(Path(__file__).parent)
    seen: BaseException | None = err
    while seen is not None and not isinstance(seen, GuardOnDataDependentSymNode):
        seen = seen.__cause__ or seen.__context__
    if seen is None:
        return None
    ours = [f for f in traceback.extract_tb(seen.__traceback__) if f.filename.startswith(package)]
    return f"{Path(ours[-1].filename).name}:{ours[-1].lineno} in {ours[-1].name}" if ours else "the forward"


def _onnx_program(model: nn.Module, img_size: int) -> Any:
    """``torch.onnx.export`` of ``model`` in eval mode, dynamic in the batch size (exported at batch 2: torch.export
    specialises a size of 1)."""
    _require_onnx("onnx", "onnxscript")
    device = next(model.parameters()).device
    example = torch.randn(2, 3, img_size, img_size, device=device)
    training = model.training
    model.eval()
    try:
        return torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            custom_translation_table={torch.ops.aten.sort.stable: _stable_sort},
            verbose=False,
        )
    except torch.onnx.OnnxExporterError as err:
        where = _data_dependent_call(err)
        if where is None:
            raise
        name = getattr(model, "name", type(model).__name__)
        raise OnnxExportError(
            f"reducer={name} cannot be exported to ONNX: how many tokens it keeps depends on each image ({where}), "
            "which a static graph cannot express; evaluate and benchmark it in PyTorch"
        ) from None
    finally:
        model.train(training)


def export_onnx(model: nn.Module, path: str | Path, img_size: int) -> Path:
    """Write ``model`` (a deployable reducer, or any image classifier) to ``path`` as one ONNX file (weights inside,
    so under protobuf's 2 GB: any ViT up to ViT-L); replaced atomically."""
    program = _onnx_program(model, img_size)
    path = Path(path)
    # external_data=False: an external weights file would be named after the temporary file, not ``path``.
    atomic_write(path, lambda p: program.save(p, external_data=False))
    return path


def onnx_session(model: nn.Module, img_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model`` exported to ONNX and loaded in an onnxruntime CPU session with torch's thread count (so it compares
    with eager rows at equal threads): a callable from images (B, 3, img_size, img_size), any B, to logits."""
    _require_onnx("onnx", "onnxscript", "onnxruntime")
    import onnxruntime

    program = _onnx_program(model, img_size)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(
        program.model_proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )

    def run(images: torch.Tensor) -> torch.Tensor:
        (logits,) = session.run(["logits"], {"images": images.detach().cpu().float().numpy()})
        return torch.from_numpy(logits)

    return run
