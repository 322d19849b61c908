"""Denoiser features: a score-only model, block outputs at x_t by hooks, deterministic caches with a layer axis,
diffusers backbones, and every probe kind reading one layer."""

import json
import pathlib

import numpy as np
import pytest
import torch
import yaml

from conftest import QUICKSTART, REPO, tiny_fit_args
from trajrep.cli import main
from trajrep.lightning_cli import build_cli
from trajrep.data.cache import RepresentationCache
from trajrep.data.representations import RepresentationDataModule
from trajrep.data.synthetic import SyntheticShapes
from trajrep.denoiser import DiffusersBackbone, draw_noise, list_layers, load_backbone
from trajrep.errors import TrajrepError
from trajrep.extract import build_cache, load_pretrained_model
from trajrep.analysis.collect import collect, table_rows
from trajrep.analysis.report import report
from trajrep.launch import run_inline
from trajrep.reproduce import Preset, Reproduction, check_preset, load_preset
from trajrep.reproduce import main as reproduce_main
from trajrep.probe.records import read_results, write_results
import trajrep.probe.records
from trajrep.probe.selection import summarise

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
            draws = [model.score_net.stem(model.sde.perturb(x0, level, draw_noise("test", rows, index, draw, 0,
                                                                                  x0.shape[1:]))) for draw in (0, 1)]
            by_hand = torch.stack(draws).mean(dim=0).mean(dim=(2, 3))
            np.testing.assert_allclose(reader.representations("test", [index], "stem")[:5, 0], by_hand.numpy(),
                                       rtol=1e-4, atol=1e-5)


def test_a_test_image_does_not_share_its_noise_with_the_training_image_of_its_index():
    rows, shape = torch.arange(4), (1, 8, 8)
    train, test = (draw_noise(split, rows, 1, 0, 0, shape) for split in ("train", "test"))
    assert torch.equal(train, draw_noise("train", rows, 1, 0, 0, shape))  # seeded: the same every time
    assert (train - test).abs().amax(dim=(1, 2, 3)).min() > 0.5  # no row repeats the other split's


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
    main(probe_args(kind, score_only, cache, tmp_path, "--data.layer=up.2"))
    (path,) = tmp_path.glob(f"{kind}-*.json")
    assert f"-{cache.name}-up.2-" in path.name  # the cache it read, and the layer
    context = read_results(path)["context"]
    assert context["layer"] == "up.2" and context["latent_dim"] == RepresentationCache(cache).feature_dim[2]
    assert context["encoder_mode"] == "denoiser (score-only)"


def probe_args(kind: str, checkpoint: pathlib.Path, cache: pathlib.Path, results: pathlib.Path,
               *data: str) -> list[str]:
    """A two-epoch grid of one probe kind on the test cache's blocks (`data`: which of them, and how)."""
    small = ["--model.head.d_model=32", "--model.head.ffn_dim=64"] if kind in ("transformer", "continuous") else []
    training = [] if kind == "knn" else ["--data.seeds=[0,1]", "--model.learning_rates=[0.001,0.0001]",
                                         "--trainer.max_epochs=2"]
    return ["validate" if kind == "knn" else "fit", "--config", str(REPO / "configs" / "probe" / f"{kind}.yaml"),
            f"--data.checkpoint={checkpoint}", f"--data.cache_dir={cache.parent}", "--data.source=denoiser",
            f"--data.blocks={json.dumps(BLOCKS)}", "--data.draws=2", "--data.images.init_args.num_train=64",
            "--data.images.init_args.num_test=48", "--data.granularities=[2]", f"--model.results_dir={results}",
            "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={results}", *training, *small, *data]


def test_layer_tokens_are_every_block_at_every_t_zero_padded_and_feed_the_transformer(score_only, cache, tmp_path,
                                                                                       capsys):
    args = probe_args("transformer", score_only, cache, tmp_path, "--data.layer_tokens=true",
                      "--data.standardize=false")
    data = build_cli(args[1:], run=False).datamodule
    x, _ = data.tensors("test")
    stored = RepresentationCache(cache)
    widths = stored.feature_dim
    assert x.shape == (48, len(BLOCKS) * 3, max(widths)) and data.times == [0.0, 0.5, 1.0] * len(BLOCKS)
    for index, block in enumerate(BLOCKS):  # block by block, each t of the grid, then zeros to the widest
        tokens = x[:, 3 * index:3 * index + 3]
        torch.testing.assert_close(tokens[..., :widths[index]],
                                   torch.from_numpy(stored.representations("test", [0, 1, 2], block)).float())
        assert not tokens[..., widths[index]:].any()
    main(args)
    (path,) = tmp_path.glob("transformer-layers-*.json")
    context = read_results(path)["context"]
    assert context["layer_tokens"] == BLOCKS and "layer" not in context and context["times"] == data.times
    with pytest.raises(SystemExit):
        main(args + ["--data.layer=up.2"])
    assert "layer_tokens serves every block at every t: leave out layer" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a single-t probe would pool the blocks of each t
        main(probe_args("mlp", score_only, cache, tmp_path, "--data.layer_tokens=true"))
    assert "the mlp probe selects one t, and layer_tokens serves every t once per block" in capsys.readouterr().err


def probe_record(folder: pathlib.Path, kind: str, seed: int, accuracies: dict, **context) -> None:
    """A result file as a probe writes it, of members whose (val, test) accuracy per t is `accuracies`."""
    members = [{"task": "shape", "time": time, "lr": lr, "seed": probe_seed, "val_acc": val - lr, "test_acc": test}
               for time, (val, test) in accuracies.items() for lr in (0.1, 0.01, 0.001) for probe_seed in (0, 1)]
    if kind not in ("mlp", "linear"):  # a mixer: one accuracy, no t
        members = [{**member, "time": None} for member in members if member["time"] == 0.5]
    write_results(folder, members, summarise(members), {
        "probe": kind, "dataset": "shapes", "encoder_mode": "denoiser (score-only)", "encoder_name": "score",
        "latent_dim": 16, "pretrain_seed": seed, "pretrain_steps": 4, "times": [0.0, 0.5, 1.0], "blocks": BLOCKS,
        "cache_key": f"{seed}{context.get('layer', 'tokens')}", "settings_digest": kind, **context})


def test_the_table_names_the_code_revision_of_its_records_and_warns_when_they_mix(tmp_path, monkeypatch):
    probes = tmp_path / "probes"
    monkeypatch.setattr(trajrep.probe.records, "_REVISION", "aaa111")
    probe_record(probes / "stem", "mlp", 0, {0.0: (0.6, 0.6)}, layer="stem")
    report(probes, tmp_path)
    assert "Every record comes from code revision aaa111." in (tmp_path / "table.md").read_text()
    monkeypatch.setattr(trajrep.probe.records, "_REVISION", "bbb222+dirty")
    probe_record(probes / "up.2", "mlp", 0, {0.0: (0.6, 0.6)}, layer="up.2")
    report(probes, tmp_path)
    assert ("Warning: the records come from 2 code revisions: aaa111 (1 result file), bbb222+dirty (1 result "
            "file).") in (tmp_path / "table.md").read_text()


def test_a_replicated_control_at_a_block_is_matched_to_that_blocks_best_t(tmp_path):
    """On multi-task data the mixers' block (best on average over tasks) may not be a task's own best block: the
    control counts where it repeats the MLP's best t at its block, whichever block validates best overall."""
    probes = tmp_path / "probes"
    probe_record(probes / "stem", "mlp", 0, {0.0: (0.8, 0.8), 0.5: (0.6, 0.6)}, layer="stem")  # chosen: t = 0
    probe_record(probes / "up.2", "mlp", 0, {0.0: (0.6, 0.6), 0.5: (0.7, 0.7)}, layer="up.2")  # best at t = 0.5
    for kind, time in (("transformer", 0.5), ("concat", 0.0)):
        probe_record(probes / "chosen-block" / "replicated", kind, 0, {0.5: (0.7, 0.7)}, layer="up.2",
                     layer_selection="mlp", replicate_time=time, replicated_time=time)
    row = next(row for row in table_rows(collect(probes)) if row["encoder"] == "score")
    assert row["transformer-replicated"] is not None  # up.2's best t, repeated
    assert row["concat-replicated"] is None and row["left_out"] == {"concat-replicated": 1}  # stem's, not up.2's


def test_the_report_picks_the_block_and_t_on_validation_and_maps_linear_accuracy_over_both(tmp_path):
    # down.1 validates best at t = 0.5; up.2 tests best, which must not count
    accuracies = {"stem": {0.0: (0.50, 0.50), 0.5: (0.55, 0.55), 1.0: (0.3, 0.3)},
                  "down.1": {0.0: (0.60, 0.60), 0.5: (0.80, 0.70), 1.0: (0.4, 0.4)},
                  "up.2": {0.0: (0.70, 0.95), 0.5: (0.75, 0.90), 1.0: (0.5, 0.5)}}
    probes = tmp_path / "probes"
    for seed in (0, 1):
        for block, by_time in accuracies.items():
            for kind in ("mlp", "linear"):
                probe_record(probes / f"seed{seed}" / block, kind, seed, by_time, layer=block)
        chosen = {"layer": "down.1", "layer_selection": "the best validation accuracy of the mlp probe"}
        probe_record(probes / f"seed{seed}" / "chosen", "transformer", seed, {0.5: (0.9, 0.85)}, **chosen)
        probe_record(probes / f"seed{seed}" / "layers", "transformer", seed, {0.5: (0.9, 0.88)}, layer_tokens=BLOCKS)
    report(probes, tmp_path)
    collected = collect(probes)
    rows = {(row["encoder"], row["latent_dim"]): row for row in table_rows(collected)}
    assert set(rows) == {("score", "-"), *((f"score @ {block}", 16) for block in BLOCKS)}
    encoder = rows[("score", "-")]
    assert encoder["chosen"] == "down.1, t = 0.5 (2/2 seeds)"
    assert encoder["mlp"][0] == encoder["linear"][0] == pytest.approx(0.70)  # down.1's test accuracy at t = 0.5
    assert encoder["transformer"][0] == pytest.approx(0.85) and encoder["transformer-layers"][0] == pytest.approx(0.88)
    assert encoder["Transformer over (layer, t) - best t"][0] == pytest.approx(0.18)
    assert rows[("score @ up.2", 16)]["mlp"][0] == pytest.approx(0.90) and not rows[("score @ up.2", 16)]["chosen"]
    encoder_row = ("shapes", "score", "-", 4, 2, "shape")  # its accuracy over t: the chosen block's
    assert {t: by_seed[0] for t, by_seed in collected.per_time[encoder_row].items()} == {0.0: 0.6, 0.5: 0.7, 1.0: 0.4}
    assert "MLP's (layer, t)" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "linear_over_layers.png").stat().st_size > 0


def denoiser_preset(tmp_path: pathlib.Path, **changes) -> Preset:
    """The smoke preset with a score-only variant whose probes read two blocks of its denoiser."""
    preset = yaml.safe_load((REPO / "configs" / "presets" / "smoke.yaml").read_text())
    preset["encoders"].append({"name": "score", "args": ["--model.init_args.mode=score-only"],
                               "cache": {"source": "denoiser", "blocks": ["stem", "up.2"]},
                               "layer_tokens": ["transformer"]})
    preset.update(probes=["mlp", "linear", "transformer"], replicated=["transformer"],
                  probe_kind_args={"transformer": preset["probe_kind_args"]["transformer"]}, **changes)
    (tmp_path / "smoke.yaml").write_text(yaml.safe_dump(preset))
    return load_preset(tmp_path / "smoke.yaml", check=False)


def test_a_denoiser_variant_probes_every_block_then_mixes_at_the_block_its_mlp_validates_best(tmp_path,
                                                                                              monkeypatch):
    reproduction = Reproduction(denoiser_preset(tmp_path), "smoke", tmp_path / "runs", tmp_path / "results")
    stages = {stage.name: stage for stage in reproduction.stages()}
    run = "shapes-score-seed0"
    assert [name.removeprefix(f"probe/{run}/") for name in stages if name.startswith(f"probe/{run}/")] == [
        "g2/stem/mlp", "g2/stem/linear", "g2/up.2/mlp", "g2/up.2/linear", "g2/chosen-block/transformer",
        "g2/chosen-block/replicated/transformer", "g2/layers/transformer"]
    mlps = [f"probe/{run}/g2/stem/mlp", f"probe/{run}/g2/up.2/mlp"]
    assert stages[f"probe/{run}/g2/chosen-block/transformer"].needs == [f"cache/{run}", *mlps]
    assert "probe/shapes-reg-drl-seed0/g2/transformer" in stages  # the encoder variant's probes as before

    folder = tmp_path / "results" / "smoke" / "probes" / run / "g2"
    probe_record(folder / "stem", "mlp", 0, {0.0: (0.6, 0.9), 0.5: (0.5, 0.5), 1.0: (0.4, 0.4)}, layer="stem")
    probe_record(folder / "up.2", "mlp", 0, {0.0: (0.6, 0.6), 0.5: (0.7, 0.6), 1.0: (0.4, 0.4)}, layer="up.2")
    asked = {}
    monkeypatch.setattr(reproduction, "probe",
                        lambda where, kind, dataset, data, encoder, block: asked.setdefault(where, data))
    for name in ("chosen-block/transformer", "chosen-block/replicated/transformer", "layers/transformer"):
        stages[f"probe/{run}/g2/{name}"].work()
    chosen, replicated, tokens = (asked[f"{run}/g2/{where}"] for where in ("chosen-block", "chosen-block/replicated",
                                                                           "layers"))
    assert "--data.layer=up.2" in chosen and any(arg.startswith("--data.layer_selection=") for arg in chosen)
    assert "--data.layer=up.2" in replicated and "--data.replicate_time=0.5" in replicated  # up.2's best t
    assert "--data.layer_tokens=true" in tokens and not any(arg.startswith("--data.layer=") for arg in tokens)
    assert "--data.source=denoiser" in tokens and '--data.blocks=["stem", "up.2"]' in tokens


def test_a_mixer_that_read_another_block_than_the_chosen_one_is_probed_again(tmp_path, monkeypatch, capsys):
    reproduction = Reproduction(denoiser_preset(tmp_path), "smoke", tmp_path / "runs", tmp_path / "results")
    run = "shapes-score-seed0"
    stage = next(stage for stage in reproduction.stages() if stage.name == f"probe/{run}/g2/chosen-block/transformer")
    folder = tmp_path / "results" / "smoke" / "probes" / run / "g2"
    probe_record(folder / "stem", "mlp", 0, {0.0: (0.6, 0.6)}, layer="stem")
    probe_record(folder / "up.2", "mlp", 0, {0.0: (0.7, 0.7)}, layer="up.2")
    ran = []
    monkeypatch.setattr(reproduction, "_run_stage", lambda subcommand, args: ran.append(args))
    probe_record(folder / "chosen-block", "transformer", 0, {0.5: (0.6, 0.6)}, layer="up.2")
    assert stage.done()  # a record of the chosen block is kept
    next((folder / "up.2").glob("mlp-*.json")).unlink()  # up.2's MLP probed again, and now stem validates best
    assert not stage.done()
    probe_record(folder / "up.2", "mlp", 0, {0.0: (0.5, 0.5)}, layer="up.2")
    assert not stage.done()
    run_inline([stage])
    assert "--data.layer=stem" in ran[0] and list((folder / "chosen-block").glob("transformer-*.json")) == []
    assert "it read block up.2, and block stem is chosen now" in capsys.readouterr().out


def test_a_tie_on_validation_goes_to_the_first_block_of_the_backbone_in_the_preset_and_in_the_report(tmp_path):
    denoiser_preset(tmp_path)
    text = yaml.safe_load((tmp_path / "smoke.yaml").read_text())
    blocks = ["up.2", "stem"]  # the backbone's order, not the folders' (stem sorts first)
    text["encoders"][-1]["cache"]["blocks"] = blocks
    (tmp_path / "smoke.yaml").write_text(yaml.safe_dump(text))
    preset = load_preset(tmp_path / "smoke.yaml", check=False)
    reproduction = Reproduction(preset, "smoke", tmp_path / "runs", tmp_path / "results")
    run, probes = "shapes-score-seed0", tmp_path / "results" / "smoke" / "probes"
    tied = {"stem": {0.0: (0.7, 0.9), 0.5: (0.5, 0.5)}, "up.2": {0.0: (0.6, 0.6), 0.5: (0.7, 0.8)}}
    for block, accuracies in tied.items():
        probe_record(probes / run / "g2" / block, "mlp", 0, accuracies, layer=block, blocks=blocks)
    mixer = next(probing for probing in reproduction.probings(preset.encoders[-1]) if probing.kind == "transformer")
    assert reproduction.chosen_block(run, mixer) == "up.2"
    row = next(row for row in table_rows(collect(probes)) if row["encoder"] == "score")
    assert row["chosen"].startswith("up.2, t = 0.5") and row["mlp"][0] == pytest.approx(0.8)


@pytest.mark.slow
def test_a_preset_of_a_score_only_model_and_its_random_weights_ends_with_the_block_and_t_it_chose(tmp_path,
                                                                                                  scratch_cwd,
                                                                                                  monkeypatch):
    denoiser_preset(tmp_path)  # its cache_dir (cache/smoke) is relative: it lands in the scratch folder
    text = yaml.safe_load((tmp_path / "smoke.yaml").read_text())  # the score-only variant alone, one seed
    text.update(encoders=[text["encoders"][-1]], seeds=[0], replicated=[])
    (tmp_path / "smoke.yaml").write_text(yaml.safe_dump(text))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    reproduce_main([str(tmp_path / "smoke.yaml"), "--runs", str(tmp_path / "runs"), "--results",
                    str(tmp_path / "results")])
    rows = {row["encoder"]: row for row in table_rows(collect(tmp_path / "results" / "smoke" / "probes"))
            if row["task"] == "shape"}
    assert set(rows) == {"pixels", *(f"{untrained}score{block}" for untrained in ("", "untrained ")
                                     for block in ("", " @ stem", " @ up.2"))}
    for name in ("score", "untrained score"):
        assert rows[name]["chosen"].split(",")[0] in ("stem", "up.2")
        assert all(rows[name][kind] for kind in ("mlp", "linear", "transformer", "transformer-layers"))
    assert (tmp_path / "results" / "smoke" / "linear_over_layers.png").stat().st_size > 0
    untrained = next((tmp_path / "results" / "smoke" / "probes" / "shapes-score-untrained").rglob("mlp-*.json"))
    context = read_results(untrained)["context"]
    assert context["pretrain_steps"] == 0 and "every layer random" in context["untrained_init"]


def test_a_preset_refuses_layer_tokens_without_blocks_and_blocks_without_the_mlp(tmp_path):
    def checked(**changes) -> None:
        preset = yaml.safe_load((REPO / "configs" / "presets" / "smoke.yaml").read_text())
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**preset, **changes}))
        check_preset(load_preset(tmp_path / "bad.yaml", check=False), "the preset")

    with pytest.raises(TrajrepError, match="layer_tokens are for denoiser features; add source: denoiser"):
        checked(encoders=[{"name": "drl", "layer_tokens": ["transformer"]}])
    with pytest.raises(TrajrepError, match="layer_tokens concat: only the transformer reads"):
        checked(encoders=[{"name": "score", "cache": {"source": "denoiser", "blocks": ["stem"]},
                           "layer_tokens": ["concat"]}])
    with pytest.raises(TrajrepError, match="reads denoiser blocks, and its mixers .* add mlp to probes"):
        checked(probes=["linear", "transformer"], replicated=[], probe_kind_args={}, pixel_probe_args={},
                encoders=[{"name": "score", "cache": {"source": "denoiser", "blocks": ["stem"]}}])


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
    build_cache(data)
    x, _ = data.tensors("train")
    assert x.shape == (58, 3, 16) and data.metadata["backbone"]["timesteps"] == [0, 500, 999]
    assert "sde" not in data.metadata  # no VE SDE: the continuous head keeps its own
    with pytest.raises(TrajrepError, match="no feature-map block.*down_blocks.9.*mid_block"):
        build_cache(RepresentationDataModule(str(tmp_path / "ddpm"), images, source="denoiser",
                                             blocks=["down_blocks.9"], granularities=[2],
                                             cache_dir=str(tmp_path / "cache")))
    (tmp_path / "ddpm" / "scheduler_config.json").unlink()
    with pytest.raises(TrajrepError, match="scheduler_config.json"):
        load_backbone(tmp_path / "ddpm")
