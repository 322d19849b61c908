"""`python -m trajrep.analysis PROBES_DIR`: the same as `trajrep analyse PROBES_DIR`."""

from trajrep.analysis.per_task import main

main()
