"""Threads: the CPUs a process may use are read from its affinity and cgroup quota, and --threads is honoured."""

import torch
import pytest

from conftest import tiny_fit_args
from trajrep.lightning_cli import build_cli
from trajrep.errors import TrajrepError
from trajrep.threads import available_cpus, cgroup_cpu_limit, default_workers


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_cgroup_quotas_are_read_and_rounded_up(tmp_path):
    v2 = tmp_path / "cpu.max"
    v2.write_text("150000 100000\n")
    assert cgroup_cpu_limit(v2, (tmp_path / "none", tmp_path / "none")) == 2
    v2.write_text("max 100000\n")
    assert cgroup_cpu_limit(v2, (tmp_path / "none", tmp_path / "none")) is None
    quota, period = tmp_path / "quota", tmp_path / "period"
    quota.write_text("50000"), period.write_text("100000")
    assert cgroup_cpu_limit(tmp_path / "absent", (quota, period)) == 1
    quota.write_text("-1")
    assert cgroup_cpu_limit(tmp_path / "absent", (quota, period)) is None


def test_the_cli_sets_the_threads_asked_for_or_the_cpus_available(tmp_path):
    build_cli(tiny_fit_args(tmp_path, 1, "--threads=1")[1:], run=False)
    assert torch.get_num_threads() == 1
    build_cli(tiny_fit_args(tmp_path, 1)[1:], run=False)
    assert torch.get_num_threads() == available_cpus() >= 1
    with pytest.raises(TrajrepError, match="threads must be >= 1"):
        build_cli(tiny_fit_args(tmp_path, 1, "--threads=0")[1:], run=False)


def test_file_datasets_default_their_workers_from_the_cpus(tmp_path):
    from test_data import fake_image_folder
    from trajrep.data import ImageFolder

    fake_image_folder(tmp_path)
    assert ImageFolder(root=str(tmp_path)).num_workers == default_workers() == max(0, min(4, available_cpus() - 1))
    assert ImageFolder(root=str(tmp_path), num_workers=0).num_workers == 0
