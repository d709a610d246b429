"""Token maps (issue 10): one API over every reducer, what the maps mean, tokred-visualize, the training callback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import FAST, peaked, run_cli
from tokred.cli import visualize as visualize_cli
from tokred.config import compose_config
from tokred.data.synthetic import ShapesDataset
from tokred.reducers import available_reducers, create_reducer
from tokred.reducers.base import TokenMap
from tokred.reducers.sit import SiT
from tokred.training.run import train
from tokred.visualize import TokenMapCallback, group_edges, overlay, select_blocks, token_map_callbacks

# Knobs that make each reducer actually remove or merge tokens on a 12-block, 16-patch ViT at init. A reducer
# missing here is tested at its defaults; the test then requires that it reduces something there.
REDUCING = {
    "patch_slimming": {"target_ratio": 0.5},  # the data-free pyramid
    "vit_slim": {"budget": {"attn": 1.0, "mlp": 1.0, "patch": 0.5}},
}
FAST_DATA = [o for o in FAST if not o.startswith("logger=")]
ROW_PX = int(1.8 * 120)  # one figure row: 1.8 in at save_figure's 120 dpi


def images(b: int = 3) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(b, 3, 32, 32)


# ------------------------------------------------------------------------------------------------ the maps
@pytest.mark.parametrize("name", available_reducers())
def test_every_reducer_maps_each_block_on_the_patch_grid_consistently_with_its_cost(make_vit, name):
    model = create_reducer({"name": name, **REDUCING.get(name, {})}, peaked(make_vit(depth=12))).deployable()
    maps = model.token_maps(images())
    # CLS included; per-image methods (model.adaptive) report the mean count over the images drawn
    tokens = (model.cost(images()) if model.adaptive else model.cost()).tokens_per_block
    assert [m.block for m in maps] == list(range(12))
    assert len({m.kind for m in maps}) == 1 and maps[0].kind in ("kept", "informative", "assignment")
    for m, n in zip(maps, tokens):
        assert m.values.shape == (3, 4, 4)
        if m.kind == "assignment":  # an id per patch: one of the n - 1 patch tokens the block runs on
            assert m.values.dtype == torch.int64 and 0 <= m.values.min() and m.values.max() < n - 1
        else:  # 0/1, and as many ones in every image as the block computes patch tokens (the cost model's count;
            # for a per-image method, as many on average)
            assert set(m.values.unique().tolist()) <= {0.0, 1.0}
            counts = m.values.flatten(1).sum(1)
            if model.adaptive:
                assert counts.mean().item() == pytest.approx(n - 1)
            else:
                assert counts.tolist() == [n - 1] * 3
    if maps[0].kind == "kept":  # pruned tokens never come back
        assert all((later.values <= earlier.values).all() for earlier, later in zip(maps, maps[1:]))
    if name != "none":
        assert min(tokens) < 17, f"{name} reduces nothing at these knobs; add some to REDUCING"


def test_evo_vit_informative_patches_follow_the_image(make_vit):
    model = create_reducer({"name": "evo_vit"}, peaked(make_vit(depth=12))).deployable()
    maps = model.token_maps(images())
    assert [int(m.values[0].sum()) for m in maps] == [16] * 4 + [8] * 8  # K = int(16 * 0.5) from start_layer 4
    chosen = maps[4].values.flatten(1)
    assert not torch.equal(chosen[0], chosen[1])  # per image: selected by its class attention, not a fixed schedule


def test_sit_maps_compose_the_tsm_assignments_back_to_the_original_patches(make_vit, monkeypatch):
    """With TSMs that merge by known, per-image maps f_k (each output the mean of its inputs), the map at a block of
    stage k must be f_k(...f_1(p)) for every original patch p: composition, in original positions, per image."""
    model: SiT = create_reducer({"name": "sit", "stage_blocks": [6, 2, 2, 2]}, make_vit(depth=12)).eval()
    generator = torch.Generator().manual_seed(0)
    keys = sorted(model.tsms, key=int)
    sizes = [16] + [model.tsms[key].n_out for key in keys]  # patch tokens per stage
    by_stage = [torch.arange(16).expand(3, 16)]  # stage 0: every patch is its own token
    for key, n_in, n_out in zip(keys, sizes, sizes[1:]):
        # A random surjection per image (every output gets an input); each output token averages its inputs.
        target = torch.stack(
            [
                torch.cat([torch.arange(n_out), torch.randint(n_out, (n_in - n_out,), generator=generator)])[
                    torch.randperm(n_in, generator=generator)
                ]
                for _ in range(3)
            ]
        )
        weights = torch.nn.functional.one_hot(target, n_out).float()
        weights = weights / weights.sum(dim=1, keepdim=True)
        monkeypatch.setattr(model.tsms[key], "weights", lambda x, w=weights: w)
        by_stage.append(target.gather(1, by_stage[-1]))
    maps = model.token_maps(images())
    stage_of_block = [0] * 6 + [1] * 2 + [2] * 2 + [3] * 2
    for m, stage in zip(maps, stage_of_block):
        assert m.kind == "assignment"
        assert torch.equal(m.values.flatten(1), by_stage[stage]), f"block {m.block}"
    assert not torch.equal(by_stage[1][0], by_stage[1][1])


# ------------------------------------------------------------------------------------------------ drawing
def test_drawing_dims_what_is_not_kept_and_outlines_merged_groups():
    picture = torch.rand(8, 8, 3).numpy()
    kept = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    drawn = overlay(picture, kept, "kept")
    assert (drawn[:4, :4] == picture[:4, :4]).all() and not (drawn[4:, 4:] == picture[4:, 4:]).any()
    # Two groups, top row and bottom row: one horizontal edge across the 8-px image, as two patch-wide segments.
    assert group_edges(torch.tensor([[0, 0], [1, 1]]), 8, 8) == [[(-0.5, 3.5), (3.5, 3.5)], [(3.5, 3.5), (7.5, 3.5)]]
    assert group_edges(torch.tensor([[2, 2], [2, 2]]), 8, 8) == []


def test_callback_draws_every_n_epochs_and_at_the_last():
    callback = TokenMapCallback(Path("unused"), every_n_epochs=5)
    assert [e for e in range(12) if callback.due(e, 12)] == [4, 9, 11]
    assert token_map_callbacks({"every_n_epochs": 0}, Path("run")) == []
    assert token_map_callbacks(None, Path("run")) == []
    with pytest.raises(ValueError, match="visualize.every_n_epochs=-1"):
        token_map_callbacks({"every_n_epochs": -1}, Path("run"))


def test_select_blocks_shows_where_the_map_changes_thinned_evenly():
    changes_at = {0, 3, 7, 9, 10}
    values, maps = torch.zeros(1, 2, 2), []
    for block in range(12):
        values = values + (block in changes_at)
        maps.append(TokenMap(block, "kept", values))
    assert select_blocks(maps) == [0, 3, 9, 10]
    assert select_blocks(maps, most=5) == sorted(changes_at)
    assert select_blocks([TokenMap(b, "kept", torch.ones(1, 2, 2)) for b in range(12)]) == [0, 11]  # first, last


# ------------------------------------------------------------------------------------------------ training + CLI
@pytest.fixture(scope="module")
def evo_run(tmp_path_factory) -> Path:
    """A FAST Evo-ViT run, cut to 1 epoch of 2 steps, with the token-map callback at its default schedule."""
    root = tmp_path_factory.mktemp("evo")
    cfg = compose_config([*FAST, f"paths.root={root}", "reducer=evo_vit", "trainer.max_epochs=1"])
    cfg.paths.output_dir = str(root / "run")
    train(cfg)
    return root / "run"


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_training_callback_writes_the_last_epochs_token_maps(evo_run):
    # every_n_epochs=5 (the default) in a 1-epoch fit: the last epoch is drawn all the same.
    assert [p.name for p in (evo_run / "token_maps").iterdir()] == ["train_epoch_000.png"]
    width, height = png_size(evo_run / "token_maps/train_epoch_000.png")
    assert height == 8 * ROW_PX and width >= 3 * ROW_PX  # 8 validation images; the input and >= 2 blocks


def test_cli_draws_an_export_and_a_lightning_checkpoint_side_by_side(evo_run, tmp_path, capsys):
    out = tmp_path / "figs"
    code, stdout, err = run_cli(
        visualize_cli.main,
        capsys,
        *FAST_DATA,
        f"paths.root={tmp_path}",
        f"hydra.run.dir={out}",
        "n=3",
        f"ckpt_path=[{evo_run / 'export'},{evo_run / 'checkpoints/train/last.ckpt'}]",
        "blocks=[0,4,8]",
    )
    assert code == 0, err[-2000:]
    written = [Path(line) for line in stdout.split()]
    assert [p.name for p in written] == ["evo_vit-1.png", "evo_vit-2.png", "comparison.png"]
    assert png_size(written[0]) == (4 * ROW_PX, 3 * ROW_PX)  # input + 3 blocks, one row per image
    # input + the two models; matplotlib releases round the figure's pixel width differently by one
    assert png_size(written[2])[0] == pytest.approx(int(1.9 * 120) * 3, abs=1)


def test_cli_reads_a_directory_of_images(evo_run, tmp_path, capsys):
    folder = tmp_path / "pictures" / "some_class"
    folder.mkdir(parents=True)
    data = ShapesDataset(3, 96, seed=5, split="val")  # larger than the model's 64 px: resized and centre-cropped
    for i, picture in enumerate(data.images):
        Image.fromarray(picture).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    code, stdout, err = run_cli(
        visualize_cli.main,
        capsys,
        *FAST_DATA,
        f"paths.root={tmp_path}",
        f"hydra.run.dir={tmp_path / 'figs'}",
        f"ckpt_path={evo_run}",
        f"images={tmp_path / 'pictures'}",
    )
    assert code == 0, err[-2000:]
    assert png_size(Path(stdout.split()[-1]))[1] == 3 * ROW_PX  # n=8 asked, 3 images found


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["images=/nonexistent/pictures"], "neither a dataset split (train, val) nor an existing directory"),
        (["images={empty}"], "holds no image files"),
        (["ckpt_path={bad}"], "cannot read"),
        (["ckpt_path=null"], "ckpt_path is required"),
        (["blocks=[12]"], "has blocks 0..11"),
    ],
)
def test_cli_bad_input_is_one_line(evo_run, tmp_path, capsys, args, fragment):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    args = [a.format(empty=tmp_path / "empty", bad=tmp_path / "bad.ckpt") for a in args]
    if not any(a.startswith("ckpt_path=") for a in args):
        args.append(f"ckpt_path={evo_run / 'export'}")
    code, _, err = run_cli(visualize_cli.main, capsys, *FAST_DATA, f"paths.root={tmp_path}", *args)
    line = err.strip().splitlines()[-1]
    assert code == 2 and line.startswith("tokred-visualize: error: ") and fragment in line, err[-2000:]
