"""A probe kind is one registry entry (trajrep.probe.kinds): registered there, it runs through the CLI, a preset and the
report without any other file naming it."""

import dataclasses

import pytest
import yaml

from conftest import REPO
from trajrep.errors import TrajrepError
from trajrep.probe.kinds import KINDS, Kind, build_head, register, single_time_kinds
from trajrep.nn.probes import MeanHead, MeanOptions, ProbeHead, SingleTimeHead
from trajrep.analysis.collect import columns, differences
from trajrep.reproduce import main as reproduce_main
from trajrep.probe.records import read_results


@dataclasses.dataclass(frozen=True)
class MaxOptions(MeanOptions):
    """The MLP's options, for the toy mixer."""


class MaxHead(MeanHead):
    """A toy mixer: the MLP on each feature's largest value over t."""

    Options = MaxOptions

    def forward(self, x, t=None):
        return self.mlp(self.member_batches(x).amax(dim=2))


def test_each_built_in_kind_says_what_its_head_is_and_reading_the_registry_imports_no_head():
    for name, kind in KINDS.items():
        if kind.head is not None:
            assert isinstance(kind.head, str), name  # a path: trajrep.analysis reads the registry, never a model
            assert kind.single_time == issubclass(kind.head_class(), SingleTimeHead), name
        assert not kind.attention or kind.mixer, name


def test_the_registry_orders_the_table_and_says_which_kinds_mix():
    assert list(columns())[:len(KINDS)] == list(KINDS)  # the table lists kinds in registry order
    assert single_time_kinds() == ["mlp", "linear", "knn"]
    assert [column for column, baseline, _ in differences() if baseline == "mlp"] == [
        "gru", "transformer", "continuous", "gru-layers", "transformer-layers", "continuous-layers",
        "concat", "mean", "weighted"]  # the mixers, then the pooling heads over t
    replicated = [column for _, column, _ in differences() if column.endswith("-replicated")]
    assert replicated[:3] == ["gru-replicated", "transformer-replicated", "continuous-replicated"]  # mixers first



def test_a_head_without_options_is_refused_where_it_is_registered_and_knn_builds_no_head(monkeypatch):
    class NoOptionsHead(ProbeHead):
        """A head that forgot its options class."""

    monkeypatch.setattr("trajrep.probe.kinds.KINDS", dict(KINDS))  # nothing registered here outlives the test
    with pytest.raises(TrajrepError, match="the head NoOptionsHead names no options class"):
        register("no-options", Kind(NoOptionsHead, "no options", config="mean", mixer=True))
    with pytest.raises(TrajrepError, match="the knn probe trains no head"):
        build_head("knn", None, num_members=1, feature_dim=4, num_times=2, num_classes=[3], seeds=[0])


@pytest.mark.slow
def test_a_kind_registered_in_one_place_runs_through_the_cli_a_preset_logged_to_wandb_and_the_report(
        tmp_path, scratch_cwd, monkeypatch):
    monkeypatch.setitem(KINDS, "max", Kind(MaxHead, "max over t", config="mean", mixer=True))  # as register() does
    preset = yaml.safe_load((REPO / "configs" / "presets" / "smoke.yaml").read_text())
    preset.update(seeds=[0], probes=["mlp", "max"], replicated=[], probe_kind_args={})
    preset["encoders"][0]["untrained"] = False
    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(preset))
    monkeypatch.setenv("WANDB_MODE", "offline")  # no account needed
    monkeypatch.setenv("WANDB_SILENT", "true")
    reproduce_main([str(tmp_path / "toy.yaml"), "--runs", str(tmp_path / "runs"), "--results",
                    str(tmp_path / "results"), "--wandb-project", "trajrep-toy"])
    (record,) = (tmp_path / "results" / "toy" / "probes").rglob("max-*.json")
    results = read_results(record)
    assert results["context"]["probe"] == "max" and len(results["records"]) == 4 * 2 * 2
    assert results["context"]["config"]["model"]["head"]["class_path"].endswith("test_kinds.MaxOptions")
    header = (tmp_path / "results" / "toy" / "table.md").read_text().splitlines()[4]
    assert "| max over t |" in header and "| max over t - best t |" in header
    # One W&B run per stage (pretraining, the two probes, the pixels' MLP, the report; a cache logs nothing),
    # the report's with the tables.
    runs = list((tmp_path / "runs" / "toy").rglob("offline-run-*"))
    assert len(runs) == 1 + 2 + 1 + 1
    (report_run,) = [run for run in runs if list(run.rglob("results_table*.table.json"))]
    assert list(report_run.rglob("accuracy_vs_t_table*.table.json"))
