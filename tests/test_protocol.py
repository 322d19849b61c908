"""The probe protocol's instruments: standardised inputs, the replicated-best-t control, the linear and kNN
probes, convergence evidence in summaries and tables, and the calibrated untrained control."""

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO
from trajrep.cli import main
from trajrep.data.representations import ProbeData
from trajrep.probe.knn import knn_predict
from trajrep.nn.probes import LinearHead
from trajrep.pretrain.online_probe import between_image_fraction
from trajrep.analysis.collect import collect, table_rows
from trajrep.analysis.report import report
from trajrep.probe.records import read_results, write_results
from trajrep.probe.selection import summarise


def stages(shift: float = 0.0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    scale = torch.tensor([[1.0, 100.0], [0.01, 5.0], [3.0, 0.5]])  # (T = 3, d = 2): very different scales
    made = {}
    for name in ("train", "val", "test"):
        x = 7.0 + scale * torch.randn(400, 3, 2, generator=generator)
        made[name] = (x + (shift if name == "test" else 0.0), torch.randint(3, (400,), generator=generator))
    return made


def served(standardize: bool = True, replicate_time: float | None = None, shift: float = 0.0) -> ProbeData:
    data = ProbeData.from_tensors(stages(shift), times=[0.0, 0.5, 1.0], num_classes=[3], seeds=[0],
                                  standardize=standardize, replicate_time=replicate_time)
    data.setup("fit")
    return data


def test_standardisation_uses_training_statistics_only():
    data, raw = served(shift=10.0), stages(shift=10.0)
    train, test = data.tensors("train")[0], data.tensors("test")[0]
    torch.testing.assert_close(train.mean(dim=0), torch.zeros(3, 2), atol=1e-4, rtol=0)
    torch.testing.assert_close(train.std(dim=0), torch.ones(3, 2), atol=1e-4, rtol=0)
    # The test split keeps its shift, measured in units of the TRAIN std of each (t, dimension).
    train_std = raw["train"][0].std(dim=0)
    torch.testing.assert_close(test.mean(dim=0), (raw["test"][0].mean(dim=0) - raw["train"][0].mean(dim=0))
                               / train_std, atol=1e-3, rtol=1e-3)
    assert (test.mean(dim=0) > 0.5 * 10.0 / train_std).all()
    assert data.metadata["standardized"] is True


def test_standardisation_off_serves_the_raw_representations():
    data = served(standardize=False)
    assert torch.equal(data.tensors("val")[0], stages()["val"][0])
    assert data.metadata["standardized"] is False


def test_replicate_time_feeds_the_same_vector_at_every_position():
    data, plain = served(replicate_time=0.5), served()
    for stage in ("train", "val", "test"):
        x = data.tensors(stage)[0]
        assert x.shape == (400, 3, 2)
        for position in range(3):
            assert torch.equal(x[:, position], plain.tensors(stage)[0][:, 1])
    assert data.metadata["replicated_time"] == 0.5


def test_knn_matches_a_brute_force_vote():
    generator = torch.Generator().manual_seed(1)
    bank, labels = torch.randn(30, 5, generator=generator), torch.randint(4, (30,), generator=generator)
    queries = torch.randn(7, 5, generator=generator)
    predicted = knn_predict(bank, labels, queries, num_classes=4, ks=[1, 5, 30], temperature=0.1)
    for row, k in enumerate([1, 5, 30]):
        for q in range(7):
            similarity = [float(F.cosine_similarity(queries[q], bank[n], dim=0)) for n in range(30)]
            nearest = sorted(range(30), key=lambda n: -similarity[n])[:k]
            scores = [sum(torch.exp(torch.tensor(similarity[n] / 0.1)) for n in nearest if labels[n] == c)
                      for c in range(4)]
            assert int(predicted[row, q]) == max(range(4), key=lambda c: float(scores[c]))


def test_linear_head_member_is_a_plain_linear_at_its_time():
    head = LinearHead(2, 4, 3, [5], seeds=[0, 1], time_index=[2, 0])
    x = torch.randn(6, 3, 4)
    logits = head(x)
    for g, t in enumerate([2, 0]):
        torch.testing.assert_close(logits[g], head.linear.to_linear(g)(x[:, t]))


def test_summaries_say_whether_the_probe_converged():
    records = [{"task": "c", "time": None, "lr": lr, "seed": s, "best_epoch": epoch, "val_acc": val,
                "test_acc": 0.5}
               for lr, epoch, val in ((1e-2, 9, 0.9), (1e-3, 9, 0.8), (1e-4, 3, 0.7)) for s in (0, 1)]
    summary = summarise(records, epochs=10)["c"]
    assert summary["lr"] == 1e-2 and summary["at_grid_edge"]
    assert summary["last_epoch_fraction"] == pytest.approx(4 / 6)
    inside = summarise([{**r, "val_acc": 0.95} if r["lr"] == 1e-3 else r for r in records], epochs=10)["c"]
    assert inside["lr"] == 1e-3 and not inside["at_grid_edge"]


@pytest.fixture(scope="module")
def knn_results(tiny_checkpoint, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("knn")
    main(["validate", "--config", str(REPO / "configs" / "probe" / "knn.yaml"),
          f"--data.checkpoint={tiny_checkpoint}", f"--data.cache_dir={out / 'cache'}",
          "--data.images.init_args.num_train=320", "--data.images.init_args.num_test=160",
          "--data.granularities=[2]", "--model.ks=[1,20]", f"--model.results_dir={out / 'results'}",
          "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={out}"])
    (path,) = (out / "results").glob("knn-*.json")
    return read_results(path)


def test_knn_probe_runs_from_its_config_and_selects_k_on_validation(knn_results):
    records = knn_results["records"]
    assert len(records) == 4 * 3 * 2  # tasks x times x ks
    background = knn_results["summary"]["background"]
    assert [entry["time"] for entry in background["per_time"]] == [0.0, 0.5, 1.0]
    best = max(background["per_time"], key=lambda entry: entry["val_acc_mean"])
    assert background["time"] == best["time"] and background["k"] in (1, 20)
    chosen = [r for r in records if r["task"] == "background" and r["time"] == best["time"]]
    assert background["val_acc_mean"] == max(r["val_acc"] for r in chosen)
    assert knn_results["context"]["epochs"] is None and knn_results["context"]["standardized"] is True


def test_report_warns_under_the_table_when_probes_did_not_converge(tmp_path, tiny_checkpoint):
    main(["fit", "--config", str(REPO / "configs" / "probe" / "linear.yaml"),
          f"--data.checkpoint={tiny_checkpoint}", f"--data.cache_dir={tmp_path / 'cache'}",
          "--data.images.init_args.num_train=320", "--data.images.init_args.num_test=160",
          "--data.granularities=[2]", "--data.seeds=[0]", "--model.learning_rates=[0.001,0.0001]",
          f"--model.results_dir={tmp_path / 'results'}", "--trainer.max_epochs=2",
          "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}"])
    (path,) = (tmp_path / "results").glob("linear-*.json")
    summary = read_results(path)["summary"]["background"]
    assert summary["at_grid_edge"]  # two rates cannot bracket the selected one
    table = (report(tmp_path / "results", tmp_path / "report") / "table.md").read_text()
    assert "Warning: not converged" in table and "linear, best t (lr at the grid's edge in 1/1 seeds)" in table
    assert "| linear, best t |" in table and "| GRU |" not in table  # columns no probe filled are left out


def test_a_replicated_control_counts_only_for_the_task_whose_best_t_it_repeats(tmp_path):
    """Multi-task data: the control repeats the first task's best t (0) for both tasks; the second peaks at t = 1."""
    context = {"dataset": "two-tasks", "encoder_mode": "reg-drl", "latent_dim": 8, "pretrain_seed": 0,
               "pretrain_steps": 10, "times": [0.0, 1.0], "linear_cka": [[1.0, 0.5], [0.5, 1.0]]}
    best_time = {"first": 0.0, "second": 1.0}
    mlp = [{"task": task, "time": time, "lr": 1e-3, "seed": 0, "best_epoch": 1, "val_acc": 0.9 - abs(time - best),
            "test_acc": 0.8 - abs(time - best)} for task, best in best_time.items() for time in (0.0, 1.0)]
    mixed = [{"task": task, "time": None, "lr": 1e-3, "seed": 0, "best_epoch": 1, "val_acc": 0.9, "test_acc": 0.85}
             for task in best_time]
    write_results(tmp_path / "probes", mlp, summarise(mlp, epochs=3), {**context, "probe": "mlp"})
    write_results(tmp_path / "probes", mixed, summarise(mixed, epochs=3),
                  {**context, "probe": "transformer", "replicated_time": 0.0})
    rows = {row["task"]: row for row in table_rows(collect(tmp_path / "probes"))}
    assert rows["first"]["transformer-replicated"][0] == pytest.approx(0.85) and not rows["first"]["left_out"]
    assert rows["second"]["transformer-replicated"] is None
    assert rows["second"]["left_out"] == {"transformer-replicated": 1}
    table = (report(tmp_path / "probes", tmp_path / "report") / "table.md").read_text()
    assert "Left out: replicated controls of a t that is not the row's best t" in table
    assert "two-tasks / reg-drl / 8 / 10 / t=0,1 / second: Transformer, best t replicated (1 seed)" in table


def test_calibrated_untrained_control_has_features_that_vary_between_images():
    from trajrep.data.synthetic import SyntheticShapes
    from trajrep.pretrain.module import PretrainModule
    from trajrep.pretrain.module import calibrate_untrained

    torch.manual_seed(0)
    images = SyntheticShapes(num_train=256, num_test=64)
    model = PretrainModule(image_channels=3, image_size=32, encoder_depth=10, widen_factor=0.125, nf=8,
                           ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,)).eval()
    x0 = images.normalize(images.stacked("test")[0])
    t = torch.full((len(x0),), 0.5)

    def features() -> torch.Tensor:
        with torch.no_grad():
            return model.encoder.representation(x0, model.sde.log_sigma(t))

    initial = float(between_image_fraction(features()))
    note = calibrate_untrained(model, images, seed=0, num_images=200)
    calibrated = float(between_image_fraction(features()))
    assert initial < 0.01 < calibrated  # BatchNorm at its initial statistics leaves features almost constant
    assert "200 training images" in note
    assert not model.encoder.training
    bn = next(m for m in model.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert bn.momentum == 0.1 and bn.num_batches_tracked == 2  # cumulative over both batches, momentum restored
