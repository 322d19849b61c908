"""Everything after the probes, from result files and caches alone (never a model): records collected into table rows
(collect), the tables (tables), the figures (plots, the only module that imports matplotlib), W&B (wandb_log), the
`trajrep report` tool (report), the per-task analyses of `trajrep analyse` (per_task) and mutual information
between times (mi)."""
