"""The probe stage: grids of probe heads trained on cached representations (module), the head registry (kinds),
kNN (knn), what is reported after training (evaluation), the protocol's selection on validation (selection) and
the result files (records). The analyses read records and selection only, so nothing here is imported eagerly."""


def __getattr__(name: str):
    # Probe checkpoints written before this package existed name their model trajrep.probe.ProbeModule, and the CLI
    # rebuilds the model from that path when it resumes one (--ckpt_path).
    if name == "ProbeModule":
        from trajrep.probe.module import ProbeModule

        return ProbeModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
