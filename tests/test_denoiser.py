"""Denoiser features: a score-only model, block outputs at x_t by hooks, deterministic caches with a layer axis,
diffusers backbones, and every probe kind reading one layer."""

import json
import pathlib

import numpy as np
import pytest
import torch

from conftest import QUICKSTART, REPO, tiny_fit_args
from trajrep.cli import main
from trajrep.data.cache import RepresentationCache
from trajrep.data.representations import RepresentationDataModule
from trajrep.data.synthetic import SyntheticShapes
from trajrep.denoiser import DiffusersBackbone, draw_noise, list_layers, load_backbone
from trajrep.errors import TrajrepError
from trajrep.extract import load_pretrained_model
from trajrep.results import read_results

TINY_DATA = ["--data.init_args.num_train=64", "--data.init_args.num_test=48"]
TINY_MODEL = ["--model.init_args.nf=8", "--model.init_args.widen_factor=0.125"]
BLOCKS = ["stem", "down.1", "up.2"]


@pytest.fixture(scope="module")
def score_only(tmp_path_factory) -> pathlib.Path:
    """A 2-step score-only run of the shrunk quickstart."""
    root = tmp_path_factory.mktemp("score-only")
    main(tiny_fit_args(root, 2, "--model.init_args.mode=score-only"))
    return root / "checkpoints" / "last.ckpt"


def extract(checkpoint: pathlib.Path, cache_dir: pathlib.Path, *extra: str) -> pathlib.Path:
    main(["extract", "--config", str(REPO / QUICKSTART), *TINY_DATA, *TINY_MODEL,
          "--model.init_args.mode=score-only", "--ckpt_path", str(checkpoint), "--source=denoiser",
          f"--blocks={json.dumps(BLOCKS)}", "--granularities=[2]", f"--cache_dir={cache_dir}", "--batch_size=16",
          "--trainer.logger=false", f"--trainer.default_root_dir={cache_dir}", "--trainer.enable_progress_bar=false",
          *extra])
    (path,) = [p for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return path


@pytest.fixture(scope="module")
def cache(score_only, tmp_path_factory) -> pathlib.Path:
    return extract(score_only, tmp_path_factory.mktemp("denoiser-cache"), "--draws=2")


def test_a_score_only_model_has_no_encoder_and_says_so_where_one_is_needed(score_only, tmp_path):
    model = load_pretrained_model(score_only, ema=False)
    assert model.encoder is None and model.latent_dim == 0 and model.score_net.latent_proj is None
    state = torch.load(score_only, weights_only=True)["state_dict"]
    assert state and not any(key.startswith("encoder.") for key in state)
    with pytest.raises(TrajrepError, match="score-only.*--data.source=denoiser"):
        RepresentationDataModule(str(score_only), SyntheticShapes(num_train=64, num_test=48), granularities=[2],
                                 cache_dir=str(tmp_path))


def test_list_layers_prints_the_blocks_and_the_cache_has_one_layer_of_that_width_per_block(
        score_only, cache, capsys):
    main(["extract", "--config", str(REPO / QUICKSTART), "--backbone", str(score_only), "--list_layers=true"])
    printed = {line.split()[0]: tuple(map(int, line.split(None, 1)[1].split(" x ")))
               for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert list(printed)[0] == "stem" and all(name in printed for name in BLOCKS)
    reader = RepresentationCache(cache)
    assert reader.layers == BLOCKS and reader.feature_dim == [printed[name][0] for name in BLOCKS]
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["source"] == "denoiser" and manifest["draws"] == 2
    assert manifest["backbone"]["mode"] == "score-only" and len(manifest["backbone"]["sigmas"]) == 3
    for layer, width in zip(BLOCKS, reader.feature_dim):
        assert reader.representations("test", [0, 1, 2], layer).shape == (48, 3, width)


def test_a_hooked_block_is_its_output_at_x_t_pooled_and_averaged_over_the_draws(score_only, cache):
    model = load_pretrained_model(score_only, ema=False)
    images = SyntheticShapes(num_train=64, num_test=48)
    rows = torch.arange(5)
    x0 = images.normalize(torch.stack([images.dataset("test")[i][0] for i in rows.tolist()]))
    reader = RepresentationCache(cache)
    with torch.no_grad():
        for index, t in enumerate(reader.times):
            level = torch.full((5,), t)
            draws = [model.score_net.stem(model.sde.perturb(x0, level, draw_noise(rows, index, draw, 0, x0.shape[1:])))
                     for draw in (0, 1)]
            by_hand = torch.stack(draws).mean(dim=0).mean(dim=(2, 3))
            np.testing.assert_allclose(reader.representations("test", [index], "stem")[:5, 0], by_hand.numpy(),
                                       rtol=1e-4, atol=1e-5)


def test_features_are_the_same_in_every_run_and_for_any_batch_size(score_only, cache, tmp_path):
    again, smaller = extract(score_only, tmp_path / "again", "--draws=2"), extract(
        score_only, tmp_path / "smaller", "--draws=2", "--batch_size=7")
    assert again.name == smaller.name == cache.name  # the key: backbone, blocks, draws, noise seed, grid, data
    first = RepresentationCache(cache)
    for layer in BLOCKS:
        reference = first.representations("train", [0, 1, 2], layer)
        np.testing.assert_array_equal(RepresentationCache(again).representations("train", [0, 1, 2], layer),
                                      reference)
        # other batches, other convolution kernels: equal to float rounding (each image draws its own noise)
        np.testing.assert_allclose(RepresentationCache(smaller).representations("train", [0, 1, 2], layer),
                                   reference, rtol=1e-5, atol=1e-6)
    images = SyntheticShapes(num_train=64, num_test=48)
    key = {seed: RepresentationDataModule(str(score_only), images, source="denoiser", blocks=BLOCKS, draws=2,
                                          noise_seed=seed, granularities=[2], cache_dir=str(cache.parent)
                                          ).cache_path.name for seed in (0, 1)}
    assert key[0] == cache.name and key[1] != cache.name


@pytest.mark.slow
def test_ddp_denoiser_features_equal_one_process_bit_for_bit(score_only, cache, tmp_path):
    path = extract(score_only, tmp_path, "--draws=2", "--trainer.accelerator=cpu", "--trainer.devices=2",
                   "--trainer.strategy=ddp_spawn")
    assert path.name == cache.name
    single, ddp = RepresentationCache(cache), RepresentationCache(path)
    for split in ("train", "test"):
        for layer in BLOCKS:
            np.testing.assert_array_equal(single.representations(split, [0, 1, 2], layer),
                                          ddp.representations(split, [0, 1, 2], layer))


@pytest.mark.parametrize("kind", ["mlp", "knn", "transformer", "continuous"])
def test_every_kind_of_probe_reads_one_layer_of_denoiser_features(kind, score_only, cache, tmp_path):
    command = "validate" if kind == "knn" else "fit"
    small = {"transformer": ['--model.head_kwargs={"d_model": 32, "ffn_dim": 64}'],
             "continuous": ['--model.head_kwargs={"d_model": 32, "ffn_dim": 64}']}.get(kind, [])
    training = [] if kind == "knn" else ["--data.seeds=[0,1]", "--model.learning_rates=[0.001,0.0001]",
                                         "--trainer.max_epochs=2"]
    main([command, "--config", str(REPO / "configs" / "probe" / f"{kind}.yaml"),
          f"--data.checkpoint={score_only}", f"--data.cache_dir={cache.parent}", "--data.source=denoiser",
          f"--data.blocks={json.dumps(BLOCKS)}", "--data.layer=up.2", "--data.draws=2",
          "--data.images.init_args.num_train=64", "--data.images.init_args.num_test=48", "--data.granularities=[2]",
          f"--model.results_dir={tmp_path}", "--trainer.enable_progress_bar=false",
          f"--trainer.default_root_dir={tmp_path}", *training, *small])
    (path,) = tmp_path.glob(f"{kind}-*.json")
    assert f"-{cache.name}-up.2-" in path.name  # the cache it read, and the layer
    context = read_results(path)["context"]
    assert context["layer"] == "up.2" and context["latent_dim"] == RepresentationCache(cache).feature_dim[2]
    assert context["encoder_mode"] == "denoiser (score-only)"


def tiny_diffusers(folder: pathlib.Path, pipeline_layout: bool) -> torch.nn.Module:
    """A randomly initialised UNet2DModel for 3 x 32 x 32 images and its DDPM scheduler, saved as
    save_pretrained writes them (the model at the top, or in unet/ beside scheduler/ as a pipeline does)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    unet.save_pretrained(folder / "unet" if pipeline_layout else folder)
    scheduler.save_pretrained(folder / "scheduler" if pipeline_layout else folder)
    return unet


@pytest.mark.parametrize("pipeline_layout", [False, True])
def test_a_saved_diffusers_model_loads_back_and_maps_t_to_its_timesteps(pipeline_layout, tmp_path):
    unet = tiny_diffusers(tmp_path, pipeline_layout)
    backbone = load_backbone(tmp_path)
    assert isinstance(backbone, DiffusersBackbone) and backbone.image_shape() == (3, 32, 32)
    for name, value in unet.state_dict().items():
        assert torch.equal(backbone.network.state_dict()[name], value), name
    assert backbone.timesteps(torch.tensor([0.0, 0.25, 1.0])).tolist() == [0, 250, 999]  # round(t * 999)
    x0, noise = torch.rand(2, 3, 32, 32) * 2 - 1, torch.randn(2, 3, 32, 32)
    alpha_bar = backbone.scheduler.alphas_cumprod[250]
    expected = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
    torch.testing.assert_close(backbone.noisy(x0, torch.full((2,), 0.25), noise), expected)
    names = [name for name, _ in list_layers(backbone)]
    assert "down_blocks.1" in names and "mid_block" in names and "up_blocks.0" in names
    assert backbone.describe([0.0, 1.0])["timesteps"] == [0, 999]


def test_diffusers_features_feed_a_probe_and_a_bad_folder_is_a_clear_error(tmp_path):
    tiny_diffusers(tmp_path / "ddpm", pipeline_layout=False)
    images = SyntheticShapes(num_train=64, num_test=48)
    data = RepresentationDataModule(str(tmp_path / "ddpm"), images, source="denoiser",
                                    blocks=["down_blocks.1", "mid_block"], layer="mid_block", granularities=[2],
                                    cache_dir=str(tmp_path / "cache"), seeds=[0])
    data.prepare_data()
    x, _ = data.tensors("train")
    assert x.shape == (58, 3, 16) and data.metadata["backbone"]["timesteps"] == [0, 500, 999]
    assert "sde" not in data.metadata  # no VE SDE: the continuous head keeps its own
    with pytest.raises(TrajrepError, match="no feature-map block.*down_blocks.9.*mid_block"):
        RepresentationDataModule(str(tmp_path / "ddpm"), images, source="denoiser", blocks=["down_blocks.9"],
                                 granularities=[2], cache_dir=str(tmp_path / "cache"))
    (tmp_path / "ddpm" / "scheduler_config.json").unlink()
    with pytest.raises(TrajrepError, match="scheduler_config.json"):
        load_backbone(tmp_path / "ddpm")
