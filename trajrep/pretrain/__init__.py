"""The pretraining stage: the DRL model and its score-only variant (module), its EMA weights (ema) and the online
trajectory probe that watches a run (online_probe)."""


def __getattr__(name: str):
    # Checkpoints written before this package existed name their model trajrep.pretrain.PretrainModule, and the
    # CLI rebuilds the model from that path when it reads one (--ckpt_path).
    if name == "PretrainModule":
        from trajrep.pretrain.module import PretrainModule

        return PretrainModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
