"""Imports flow one way, pretraining -> extraction -> caches -> probes -> analysis, read from the package's source
(every import, including those inside functions)."""

import ast

from conftest import REPO

PACKAGE = REPO / "trajrep"
PRETRAINING = ("trajrep.pretrain", "trajrep.extract", "trajrep.denoiser")
MODELS = (*PRETRAINING, "trajrep.nn", "trajrep.probe.module", "trajrep.probe.knn", "trajrep.probe.evaluation",
          "trajrep.lightning_cli")
PROBE_SIDE = ("trajrep.probe", "trajrep.data")


def imports() -> dict[str, set[str]]:
    """Every trajrep module and the modules it imports."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from trajrep import x`
        found[module] = names
    return found


def within(name: str, prefixes: tuple[str, ...]) -> str | None:
    """The prefix (a module or package) that `name` is or lies in, if any."""
    return next((prefix for prefix in prefixes if name == prefix or name.startswith(prefix + ".")), None)


def crossings(importers: tuple[str, ...], imported: tuple[str, ...]) -> set[tuple[str, str]]:
    """(module, what it reaches) for every module among `importers` that imports one of `imported`."""
    return {(module, within(name, imported)) for module, names in imports().items() if within(module, importers)
            for name in names if within(name, imported) and not within(name, (module,))}


def test_the_analysis_reads_records_and_caches_never_models():
    assert not crossings(("trajrep.analysis",), MODELS)


def test_the_probe_side_and_the_data_never_reach_the_pretraining_side():
    assert not crossings(PROBE_SIDE, PRETRAINING)


def test_nothing_imports_the_command_or_the_preset_runner():
    assert crossings(("trajrep",), ("trajrep.cli", "trajrep.reproduce")) == {("trajrep.__main__", "trajrep.cli")}


def test_only_the_figures_module_and_the_sweep_runner_import_matplotlib():
    users = {module for module, names in imports().items() if any(within(name, ("matplotlib",)) for name in names)}
    assert users == {"trajrep.analysis.plots", "trajrep.regime"}
