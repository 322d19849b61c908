"""Nothing on disk is trusted blindly: no pickle is read or written by the package, checkpoints load with
weights_only=True, and a non-finite loss stops training without touching the last good checkpoint."""

import ast
import dataclasses
import json
import math

import pytest
import torch

from conftest import REPO, tiny_fit_args
from trajrep.cli import main
from trajrep.pretrain.module import PretrainModule
from trajrep.probe.kinds import kind_of

SOURCES = sorted((REPO / "trajrep").rglob("*.py")) + sorted((REPO / "benchmarks").rglob("*.py"))


def dotted(node: ast.AST) -> str:
    """`a.b.c` of a Name/Attribute chain ('' for anything else)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def keyword(call: ast.Call, name: str):
    found = [k.value for k in call.keywords if k.arg == name]
    return found[0].value if found and isinstance(found[0], ast.Constant) else None


def pickle_uses(path, root=REPO) -> list[str]:
    """Every place in one source file that could read or write a pickle unsafely."""
    problems = []
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        where = f"{path.relative_to(root)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
            if any(name.split(".")[0] in ("dill", "cloudpickle", "joblib", "shelve", "marshal") for name in names):
                problems.append(f"{where}: imports a pickle-like serialiser")
        if isinstance(node, ast.Call):
            name = dotted(node.func)
            if name in ("pickle.load", "pickle.loads", "pickle.dump", "pickle.dumps", "pickle.Unpickler",
                        "pickle.Pickler"):
                problems.append(f"{where}: {name}")
            if name == "torch.load" and keyword(node, "weights_only") is not True:
                problems.append(f"{where}: torch.load without weights_only=True")
            if name in ("np.load", "numpy.load") and keyword(node, "allow_pickle") is not False and any(
                    k.arg == "allow_pickle" for k in node.keywords):  # numpy's default is False
                problems.append(f"{where}: np.load allowing pickles")
        if isinstance(node, ast.ClassDef) and any(dotted(b) == "pickle.Unpickler" for b in node.bases):
            if not any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in node.body):
                problems.append(f"{where}: an Unpickler without a restricting find_class")
    return problems


def test_the_scan_finds_unsafe_pickle_uses(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import pickle, torch, numpy as np\npickle.load(f)\ntorch.load(p)\nnp.load(p, allow_pickle=True)\n"
                      "class U(pickle.Unpickler):\n    pass\n")
    assert len(pickle_uses(sample, root=tmp_path)) == 4


def test_no_pickle_is_read_or_written_unsafely():
    problems = [problem for path in SOURCES for problem in pickle_uses(path)]
    assert not problems, "\n".join(problems)


def test_non_finite_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    main(tiny_fit_args(tmp_path, max_steps=2))
    last = tmp_path / "checkpoints" / "last.ckpt"
    good = torch.load(last, weights_only=True)
    original = PretrainModule.loss_terms

    def diverging(self, *args, **kwargs):
        terms = original(self, *args, **kwargs)
        return {**terms, "dsm": terms["dsm"] * math.inf} if self.global_step >= 3 else terms

    monkeypatch.setattr(PretrainModule, "loss_terms", diverging)
    with pytest.raises(SystemExit) as exit_info:
        main(tiny_fit_args(tmp_path, max_steps=6) + ["--ckpt_path", str(last)])
    assert exit_info.value.code == 2
    assert "non-finite train loss (inf) at step 3" in capsys.readouterr().err
    kept = torch.load(last, weights_only=True)
    assert kept["global_step"] == 3  # step 3 was the first to diverge; steps 1-3 (0-based 0-2) were saved
    assert all(torch.isfinite(value).all() for value in kept["state_dict"].values() if value.is_floating_point())
    assert good["global_step"] == 2


def test_the_recorded_revision_is_the_one_the_process_started_from(monkeypatch):
    import subprocess

    from trajrep.probe import records as results

    started = results.git_revision()
    assert started is None or len(started.removesuffix("+dirty")) == 40

    def moved_on(*args, **kwargs):  # what git would answer after a commit made while a preset runs
        return subprocess.CompletedProcess(args, 0, stdout="0" * 40 + "\n", stderr="")

    monkeypatch.setattr(subprocess, "run", moved_on)
    assert results.git_revision() == started


def as_recorded_today(model: dict) -> dict:
    """A ProbeModule's settings of before typed head options (`kind`, `head_kwargs`) as the CLI records them today:
    the head's options class and every field of it."""
    if "kind" not in model:
        return model
    options = kind_of(model["kind"]).head_class().Options(**(model["head_kwargs"] or {}))
    today = {key: value for key, value in model.items() if key not in ("kind", "head_kwargs")}
    return {**today, "head": {"class_path": kind_of(model["kind"]).options_path(),
                              "init_args": dataclasses.asdict(options)}}


def test_committed_result_files_keep_their_names_after_the_probe_modules_moved_and_head_options_were_typed():
    """A result file's name carries the digest of its settings, the module's class path and the head's options
    among them; records written before the probe package and before typed head options must get the same digest
    from the settings the CLI records today."""
    from trajrep.probe.records import result_settings_digest

    moved = {"trajrep.probe.ProbeModule": "trajrep.probe.ProbeModule",  # the package exposes it
             "trajrep.knn.KNNProbe": "trajrep.probe.knn.KNNProbe"}
    checked = 0
    for path in sorted(REPO.glob("results/*/probes/**/*.json")):
        context = json.loads(path.read_text())["context"]
        model = context["config"]["model"]
        if model.get("_class_path") not in moved or context.get("epochs") is None:
            continue
        digest = path.stem.rsplit("-", 1)[1]
        if len(digest) != 8 or digest == context.get("cache_key"):  # older names carry no digest
            continue
        today = {**as_recorded_today(model), "_class_path": moved[model["_class_path"]]}
        assert result_settings_digest(today, context["config"]["data"], context["epochs"]) == digest, path
        checked += bool(model.get("head_kwargs"))
    assert checked > 0  # among them, records of head options set away from their defaults
