"""ProbeModule and the selection protocol on a real (tiny) cache, through the CLI."""

import json
import logging
import pathlib
import re

import numpy as np
import pytest
import torch

from conftest import REPO
from trajrep.cli import main
from trajrep.data.representations import RepresentationDataModule
from trajrep.data.synthetic import SyntheticShapes
from trajrep.errors import TrajrepError
from trajrep.extract import build_cache
from trajrep.nn.probes import (ContinuousOptions, GRUOptions, HeadOptions, MLPOptions, MeanOptions,
                               TransformerOptions)
from trajrep.probe.kinds import head_kinds, kind_of
from trajrep.probe.evaluation import masked_test_accuracy
from trajrep.probe.module import ProbeModule
from trajrep.probe.records import read_results
from trajrep.probe.selection import best_epochs, summarise


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("probe-cache")


SMALL_HEADS = {"transformer": ["--model.head.d_model=32", "--model.head.ffn_dim=64"],
               "continuous": ["--model.head.d_model=32", "--model.head.ffn_dim=64"],
               "gru": ["--model.head.hidden_dim=32"]}


def probe_args(kind: str, checkpoint: pathlib.Path, tmp_path: pathlib.Path, cache: pathlib.Path) -> list[str]:
    small = SMALL_HEADS.get(kind, [])
    return [
        "fit", "--config", str(REPO / "configs" / "probe" / f"{kind}.yaml"),
        f"--data.checkpoint={checkpoint}", f"--data.cache_dir={cache}",
        "--data.images.init_args.num_train=320", "--data.images.init_args.num_test=160",
        "--data.granularities=[2]", "--data.seeds=[0,1]", "--data.batch_size=64",
        "--model.learning_rates=[0.001,0.0001]", f"--model.results_dir={tmp_path / 'results'}",
        "--trainer.max_epochs=2", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}",
        *small,
    ]


@pytest.mark.parametrize("kind", sorted(head_kinds()))
def test_every_head_runs_from_its_config_and_writes_records(kind, tiny_checkpoint, tmp_path, shared_cache):
    main(probe_args(kind, tiny_checkpoint, tmp_path, shared_cache))
    (path,) = (tmp_path / "results").glob(f"{kind}-*.json")
    results = read_results(path)
    tasks, lrs, seeds, times = 4, 2, 2, 3
    assert len(results["records"]) == tasks * lrs * seeds * (times if kind in ("mlp", "linear") else 1)
    record = results["records"][0]
    for field in ("dataset", "encoder_mode", "pretrain_seed", "probe", "times", "lr", "seed", "best_epoch",
                  "val_acc", "test_acc", "cache_key", "git_revision"):
        assert field in record, field
    assert record["dataset"] == "SyntheticShapes" and record["encoder_mode"] == "reg-drl"
    assert record["pretrain_seed"] == 0
    assert set(results["summary"]) == {"background", "foreground", "location", "shape"}
    if kind in ("mlp", "linear"):
        assert [entry["time"] for entry in results["summary"]["shape"]["per_time"]] == [0.0, 0.5, 1.0]
    assert results["context"]["probe"] == kind
    assert results["context"]["config"]["model"]["head"]["class_path"] == kind_of(kind).options_path()


def test_a_probe_that_first_builds_its_cache_trains_as_one_that_finds_it(tiny_checkpoint, tmp_path):
    """Building the missing cache draws from the global RNG (the model's init), whose stream the heads' dropout
    reads: the records must not depend on whether the cache was there."""
    records = []
    for run in ("builds", "finds"):
        main(probe_args("mlp", tiny_checkpoint, tmp_path / run, tmp_path / "cache"))
        (path,) = (tmp_path / run / "results").glob("mlp-*.json")
        records.append([(r["val_acc"], r["test_acc"], r["best_epoch"]) for r in read_results(path)["records"]])
    assert records[0] == records[1]


def test_other_settings_get_their_own_file_and_the_same_settings_are_replaced_only_when_asked(
        tiny_checkpoint, tmp_path, shared_cache, capsys):
    main(probe_args("mean", tiny_checkpoint, tmp_path, shared_cache))
    main(probe_args("mean", tiny_checkpoint, tmp_path, shared_cache) + ["--model.learning_rates=[0.5]"])
    first, second = sorted((tmp_path / "results").glob("mean-*.json"), key=lambda p: p.stat().st_mtime)
    assert {r["lr"] for r in read_results(first)["records"]} == {0.001, 0.0001}
    assert {r["lr"] for r in read_results(second)["records"]} == {0.5}
    before = first.read_bytes()
    with pytest.raises(SystemExit):
        main(probe_args("mean", tiny_checkpoint, tmp_path, shared_cache))
    assert "already holds results of these settings" in capsys.readouterr().err
    assert first.read_bytes() == before
    main(probe_args("mean", tiny_checkpoint, tmp_path, shared_cache) + ["--model.overwrite_results=true"])
    assert read_results(first)["records"] and len(list((tmp_path / "results").glob("mean-*.json"))) == 2


def test_a_probe_grid_resumed_from_its_checkpoint_ends_as_a_straight_one(tiny_checkpoint, tmp_path, shared_cache,
                                                                         caplog):
    """Dropout, the continuous head's time subsets and each probe seed's shuffling go on where they stopped."""
    kind = "continuous"
    def run(folder: pathlib.Path, epochs: int, *resume: str) -> int:
        """The number of steps this process trained (ProgressLog's summary line)."""
        args = probe_args(kind, tiny_checkpoint, folder, shared_cache)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            main([*args, f"--trainer.max_epochs={epochs}", "--trainer.enable_checkpointing=true",
                  "--trainer.callbacks+=ModelCheckpoint", f"--trainer.callbacks.dirpath={folder / 'checkpoints'}",
                  "--trainer.callbacks.save_last=true", "--trainer.callbacks.save_top_k=1", *resume])
        (steps,) = re.findall(r"ProbeModule fit done: (\d+) steps", caplog.text)
        return int(steps)

    straight_steps = run(tmp_path / "straight", 4)
    run(tmp_path / "resumed", 2)
    (tmp_path / "resumed" / "results").rename(tmp_path / "after-2-epochs")
    resumed_steps = run(tmp_path / "resumed", 4, f"--ckpt_path={tmp_path / 'resumed' / 'checkpoints' / 'last.ckpt'}")
    straight, resumed = ([(r["best_epoch"], r["val_acc"], r["test_acc"]) for r in read_results(path)["records"]]
                         for path in (next((tmp_path / run / "results").glob(f"{kind}-*.json"))
                                      for run in ("straight", "resumed")))
    assert resumed_steps == straight_steps // 2  # it went on at epoch 2, not from the start
    assert resumed == straight and max(epoch for epoch, _, _ in straight) >= 2  # some members improved after the stop


def test_result_file_edit_is_detected(tiny_checkpoint, tmp_path, shared_cache):
    main(probe_args("mean", tiny_checkpoint, tmp_path, shared_cache))
    (path,) = (tmp_path / "results").glob("mean-*.json")
    data = json.loads(path.read_text())
    data["records"][0]["test_acc"] = 1.0
    path.write_text(json.dumps(data))
    with pytest.raises(Exception, match="checksum mismatch"):
        read_results(path)


def test_best_single_t_is_chosen_on_validation_never_on_test():
    # Two times, one lr, two seeds: t=0 has the better validation accuracy, t=1 the better test accuracy.
    records = [
        {"task": "class", "time": 0.0, "lr": 1e-3, "seed": s, "val_acc": 0.9, "test_acc": 0.6} for s in (0, 1)
    ] + [
        {"task": "class", "time": 1.0, "lr": 1e-3, "seed": s, "val_acc": 0.7, "test_acc": 0.95} for s in (0, 1)
    ]
    summary = summarise(records)["class"]
    assert summary["time"] == 0.0 and summary["test_acc_mean"] == pytest.approx(0.6)


def test_lr_is_chosen_by_mean_validation_over_seeds():
    records = [
        {"task": "c", "time": None, "lr": 1e-3, "seed": 0, "val_acc": 0.95, "test_acc": 0.9},
        {"task": "c", "time": None, "lr": 1e-3, "seed": 1, "val_acc": 0.55, "test_acc": 0.5},
        {"task": "c", "time": None, "lr": 1e-4, "seed": 0, "val_acc": 0.8, "test_acc": 0.7},
        {"task": "c", "time": None, "lr": 1e-4, "seed": 1, "val_acc": 0.8, "test_acc": 0.8},
    ]
    summary = summarise(records)["c"]
    assert summary["lr"] == 1e-4
    assert summary["test_acc_mean"] == pytest.approx(0.75)
    assert summary["test_acc_std"] == pytest.approx(np.std([0.7, 0.8], ddof=1))


def test_a_learning_rate_where_a_member_diverged_is_not_selected():
    records = [
        {"task": "c", "time": None, "lr": 1e-2, "seed": 0, "val_acc": 0.99, "test_acc": 0.9},
        {"task": "c", "time": None, "lr": 1e-2, "seed": 1, "val_acc": 0.34, "test_acc": 0.3, "diverged": True},
        {"task": "c", "time": None, "lr": 1e-3, "seed": 0, "val_acc": 0.6, "test_acc": 0.6},
        {"task": "c", "time": None, "lr": 1e-3, "seed": 1, "val_acc": 0.6, "test_acc": 0.6},
        {"task": "c", "time": None, "lr": 1e-4, "seed": 0, "val_acc": 0.5, "test_acc": 0.5},
        {"task": "c", "time": None, "lr": 1e-4, "seed": 1, "val_acc": 0.5, "test_acc": 0.5},
    ]
    summary = summarise(records)["c"]
    assert summary["lr"] == 1e-3 and summary["diverged_settings"] == [1e-2]
    assert not summary["at_grid_edge"]  # the diverged rate above still brackets the selected one


def test_a_diverging_probe_member_is_marked_warned_about_and_not_selected(tmp_path):
    import lightning.pytorch as pl

    from trajrep.data.representations import ProbeData

    generator = torch.Generator().manual_seed(0)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(3, (n,), generator=generator)
        x = torch.randn(n, 2, 4, generator=generator)
        x[:, :, 0] += 2 * y[:, None]
        return x, y

    data = ProbeData.from_tensors({stage: split(256) for stage in ("train", "val", "test")}, times=[0.0, 1.0],
                                  num_classes=[3], seeds=[0], batch_size=32)
    module = ProbeModule(TransformerOptions(d_model=16), learning_rates=[1e6, 1e-3], seeds=[0], num_classes=[3],
                         feature_dim=4, times=[0.0, 1.0], results_dir=str(tmp_path))
    with pytest.warns(UserWarning, match=r"1 of 2 transformer probe members diverged .*lr 1e\+06"):
        pl.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   default_root_dir=tmp_path).fit(module, datamodule=data)
    records = {r["lr"]: r for r in module.member_records()}
    assert records[1e6].get("diverged") and "diverged" not in records[1e-3]
    assert summarise(list(records.values()))["task0"]["diverged_settings"] == [1e6]


def test_best_epoch_is_the_first_best_validation_epoch():
    val = np.array([[0.5, 0.2], [0.7, 0.9], [0.7, 0.4]])
    test = np.array([[0.1, 0.2], [0.3, 0.4], [0.99, 0.6]])
    epochs, val_at, test_at = best_epochs(val, test)
    assert epochs.tolist() == [1, 1] and test_at.tolist() == [0.3, 0.4]


@pytest.fixture(scope="module")
def learnable_data(tiny_checkpoint, tmp_path_factory):
    data = RepresentationDataModule(str(tiny_checkpoint), SyntheticShapes(num_train=1000, num_test=300),
                                    granularities=[4], probe_times=[0.0, 0.5, 1.0], seeds=[0, 1], batch_size=64,
                                    cache_dir=str(tmp_path_factory.mktemp("cache")))
    build_cache(data)
    return data


def fit_probe(head: HeadOptions, data: RepresentationDataModule, tmp_path: pathlib.Path, epochs: int) -> ProbeModule:
    import lightning.pytorch as pl

    module = ProbeModule(head, learning_rates=[1e-3], seeds=data.seeds, num_classes=data.num_classes,
                         task_names=data.task_names, feature_dim=data.feature_dim, times=data.times,
                         results_dir=str(tmp_path))
    pl.Trainer(max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               default_root_dir=tmp_path).fit(module, datamodule=data)
    return module


def test_mlp_probe_learns_the_background_colour(learnable_data, tmp_path):
    module = fit_probe(MLPOptions(), learnable_data, tmp_path, epochs=10)
    summary = summarise(module.member_records())
    # 9 background colours, chance 11 %: colour survives even a barely trained encoder (2 steps, d_z = 8).
    assert summary["background"]["val_acc_mean"] > 0.28
    assert len(module.val_history) == 10


def test_continuous_head_evaluates_on_times_it_never_saw(learnable_data, tmp_path):
    module = fit_probe(ContinuousOptions(d_model=32), learnable_data, tmp_path, epochs=1).eval()
    from trajrep.data.cache import RepresentationCache

    cache = RepresentationCache(learnable_data.cache_path)
    unseen = [0.25, 0.75]
    x = torch.from_numpy(cache.representations("test", [1, 3])).float()
    with torch.no_grad():
        logits = module(x, torch.tensor(unseen))
    assert logits.shape == (len(module.members), 300, 16)
    assert torch.isfinite(logits.max(dim=-1).values).all()


def test_member_chunks_train_exactly_like_one_grouped_model(learnable_data, tmp_path):
    """Chunking is a memory-locality choice only: the same members with the same seeds reach the same weights."""
    import lightning.pytorch as pl

    def train(member_chunk: int) -> ProbeModule:
        pl.seed_everything(0)
        module = ProbeModule(GRUOptions(hidden_dim=16, dropout=0.0), learning_rates=[1e-3, 1e-4],
                             seeds=learnable_data.seeds, num_classes=learnable_data.num_classes,
                             task_names=learnable_data.task_names, feature_dim=learnable_data.feature_dim,
                             times=learnable_data.times, results_dir=str(tmp_path / f"chunk{member_chunk}"),
                             member_chunk=member_chunk)
        pl.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, default_root_dir=tmp_path).fit(module, datamodule=learnable_data)
        return module

    whole, chunked = train(1000), train(3)
    assert len(whole.heads) == 1 and len(chunked.heads) == -(-len(chunked.members) // 3)
    x = torch.randn(7, len(learnable_data.times), learnable_data.feature_dim)
    with torch.no_grad():
        torch.testing.assert_close(chunked(x), whole(x), atol=1e-5, rtol=1e-5)


def test_default_chunks_are_sized_for_the_cpu_and_one_chunk_where_cuda_is(monkeypatch):
    def chunks(cuda: bool) -> int:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        return len(ProbeModule(GRUOptions(), learning_rates=[1e-3, 1e-4], seeds=[0, 1, 2, 3], num_classes=[3],
                               feature_dim=4, times=[0.0, 1.0]).heads)

    assert chunks(cuda=False) == 2 and chunks(cuda=True) == 1  # 8 members; 6 per chunk on a CPU


def test_the_continuous_head_reads_sigma_of_the_noise_process_the_data_names(tmp_path):
    import lightning.pytorch as pl

    from trajrep.data.representations import ProbeData

    generator = torch.Generator().manual_seed(0)
    tensors = {stage: (torch.randn(16, 2, 4, generator=generator), torch.randint(3, (16,), generator=generator))
               for stage in ("train", "val", "test")}
    data = ProbeData.from_tensors(tensors, times=[0.0, 1.0], num_classes=[3], seeds=[0], batch_size=8)
    data.metadata["sde"] = {"sigma_min": 0.002, "sigma_max": 80.0}  # as a cache of an EDM-style process says
    module = ProbeModule(ContinuousOptions(d_model=8, ffn_dim=16), learning_rates=[1e-3], seeds=[0], num_classes=[3],
                         feature_dim=4, times=[0.0, 1.0], results_dir=str(tmp_path))
    pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               default_root_dir=tmp_path).fit(module, datamodule=data)
    for head in [*module.heads, *module.best_heads]:
        assert (head.sde.sigma_min, head.sde.sigma_max) == (0.002, 80.0)
    disagreeing = ProbeModule(ContinuousOptions(sigma_max=50.0), learning_rates=[1e-3], seeds=[0], num_classes=[3],
                              feature_dim=4, times=[0.0, 1.0], results_dir=str(tmp_path / "other"))
    with pytest.raises(TrajrepError, match="disagree with the noise process of the cache"):
        pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   default_root_dir=tmp_path).fit(disagreeing, datamodule=data)



@pytest.mark.parametrize("head", [ContinuousOptions(d_model=8, ffn_dim=16, sigma_max=80.0), MLPOptions(dropout=0.0)],
                         ids=["continuous", "mlp"])
def test_a_probe_is_rebuilt_from_its_hyperparameters_as_a_checkpoint_stores_them(head):
    module = ProbeModule(head, learning_rates=[1e-3], seeds=[0], num_classes=[3], feature_dim=4, times=[0.0, 1.0])
    assert isinstance(module.hparams["head"], dict)  # plain data, which a checkpoint loads safely
    rebuilt = ProbeModule(**module.hparams)  # what load_from_checkpoint does
    assert (rebuilt.kind, rebuilt.head_options) == (module.kind, head)
    assert rebuilt.state_dict().keys() == module.state_dict().keys()

def test_a_grid_of_one_member_keeps_its_history(tmp_path):
    import lightning.pytorch as pl

    from trajrep.data.representations import ProbeData

    generator = torch.Generator().manual_seed(0)
    tensors = {stage: (torch.randn(32, 2, 4, generator=generator), torch.randint(3, (32,), generator=generator))
               for stage in ("train", "val", "test")}
    data = ProbeData.from_tensors(tensors, times=[0.0, 1.0], num_classes=[3], seeds=[0], batch_size=8)
    module = ProbeModule(MeanOptions(), learning_rates=[1e-3], seeds=[0], num_classes=[3], feature_dim=4,
                         times=[0.0, 1.0], results_dir=str(tmp_path))
    pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               default_root_dir=tmp_path).fit(module, datamodule=data)
    assert np.array(module.val_history).shape == (2, 1)
    assert len(module.member_records()) == 1


def test_masking_ablation_finds_the_one_informative_time(tmp_path):
    """The label lives in time token 0 only: hiding it costs accuracy, keeping only it costs none."""
    import lightning.pytorch as pl

    from trajrep.data.representations import ProbeData

    generator = torch.Generator().manual_seed(0)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(2, (n,), generator=generator)
        x = torch.randn(n, 3, 4, generator=generator)
        x[:, 0, 0] += 4 * labels - 2
        return x, labels

    data = ProbeData.from_tensors({stage: split(512) for stage in ("train", "val", "test")}, times=[0.0, 0.5, 1.0],
                                  num_classes=[2], seeds=[0], batch_size=64, standardize=False)
    module = ProbeModule(TransformerOptions(d_model=16, ffn_dim=32, dropout=0.0), learning_rates=[1e-3], seeds=[0],
                         num_classes=[2], feature_dim=4, times=[0.0, 0.5, 1.0], results_dir=str(tmp_path))
    pl.Trainer(max_epochs=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               default_root_dir=tmp_path).fit(module, datamodule=data)
    masked = {name: values[0] for name, values in masked_test_accuracy(module).items()}
    assert masked["full"][0] > 0.9
    assert masked["drop"][0] < 0.7 and min(masked["drop"][1:]) > 0.85  # tokens 1, 2 and the CLS key
    assert masked["keep_only"][0] > 0.9 and max(masked["keep_only"][1:]) < 0.7


def test_attention_and_masking_analyse_each_member_at_its_reported_epoch(tmp_path):
    """Members whose best validation epoch is not the last are analysed with that epoch's weights: masking's
    "nothing hidden" accuracy is then the test accuracy the records report."""
    import lightning.pytorch as pl

    from trajrep.data.representations import ProbeData

    generator = torch.Generator().manual_seed(0)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(3, (n,), generator=generator)
        x = torch.randn(n, 2, 4, generator=generator)
        x[:, 0, 0] += labels - 1.0  # a weak signal: validation accuracy wanders between epochs
        return x, labels

    data = ProbeData.from_tensors({stage: split(256) for stage in ("train", "val", "test")}, times=[0.0, 1.0],
                                  num_classes=[3], seeds=[0, 1], batch_size=32)
    module = ProbeModule(TransformerOptions(d_model=16, ffn_dim=32), learning_rates=[3e-2, 1e-3], seeds=[0, 1],
                         num_classes=[3], feature_dim=4, times=[0.0, 1.0], results_dir=str(tmp_path))
    pl.Trainer(max_epochs=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               default_root_dir=tmp_path).fit(module, datamodule=data)
    (path,) = tmp_path.glob("transformer-*.json")
    results = read_results(path)
    records = results["records"]
    assert results["context"]["attention_weights"] == "best_epoch"
    assert module.heads is not module.best_heads  # the trained weights are back once the analysis is done
    assert any(record["best_epoch"] < 4 for record in records)  # else the test shows nothing
    for record in records:
        assert record["masking"]["full"][0] == pytest.approx(record["test_acc"], abs=1e-6)
