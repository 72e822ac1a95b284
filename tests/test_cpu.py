"""Unit tests for CPU engines' cores (`app.cpu`): the pick rule, the node's claim table, cgroup quotas."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from app.config import CPUOptions
from app.cpu import available_cores, claim_cores, core_list, pick_cores


def test_alone_the_worker_gets_every_core_but_one_like_vllm_serve():
    assert pick_cores(CPUOptions(), [0, 1], {}) == [0]
    assert pick_cores(CPUOptions(), [0, 1, 2, 3], {}) == [0, 1, 2]
    assert pick_cores(CPUOptions(), [5], {}) == [5]  # one core: nothing to reserve
    assert pick_cores(CPUOptions(threads=2, reserved_cpus=0), [0, 1], {}) == [0, 1]


def test_own_engines_take_free_cores_first_then_the_reserved_then_the_least_claimed():
    # A laptop with two engines: the second takes the core the first left free (vLLM's auto-bind gave both core 0).
    assert pick_cores(CPUOptions(), [0, 1], {0: 1}) == [1]
    assert pick_cores(CPUOptions(threads=2), [0, 1, 2, 3], {0: 1, 1: 1, 2: 1}) == [0, 3]
    assert pick_cores(CPUOptions(threads=2), [0, 1, 2, 3, 4, 5], {0: 1, 1: 1}) == [2, 3]
    assert pick_cores(CPUOptions(), [0, 1], {0: 1, 1: 1}) == [0]  # no free core left: the least claimed


def test_a_shared_engine_computes_on_the_first_cores_whoever_owns_them():
    assert pick_cores(CPUOptions(share="shared", nice=10), [0, 1], {0: 1}) == [0]


def test_threads_and_share_need_the_apps_auto_binding():
    with pytest.raises(ValueError, match="omp_threads_bind 'auto'"):
        CPUOptions(omp_threads_bind="0-3", threads=2)
    with pytest.raises(ValueError, match=r"\['engine_core'\] need omp_threads_bind 'auto'"):
        CPUOptions(omp_threads_bind="nobind", engine_core="with_worker")
    assert CPUOptions().engine_core == "free"  # vLLM's own placement unless a config asks
    assert CPUOptions(omp_threads_bind="nobind", nice=5).nice == 5


def test_claim_table_gives_engines_of_one_node_disjoint_cores_and_forgets_dead_ones(tmp_path):
    claims = tmp_path / "claims.json"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    claims.write_text(f'{{"{int(gone.stdout)}": [0, 1, 2, 3]}}')  # a replica that exited
    first = claim_cores(CPUOptions(threads=1), [0, 1, 2, 3], claims)
    assert first == [0]  # the dead process's claim is gone
    # The same process claiming again (a restarted engine) replaces its own claim.
    assert claim_cores(CPUOptions(threads=1), [0, 1, 2, 3], claims) == [0]
    other = subprocess.run(
        [sys.executable, "-c", "import pathlib, sys; from app.cpu import claim_cores; "
         "from app.config import CPUOptions;"
         f"print(claim_cores(CPUOptions(threads=2), [0, 1, 2, 3], pathlib.Path({str(claims)!r})))"],
        capture_output=True, text=True, cwd=os.getcwd(), check=True)
    assert other.stdout.strip() == "[1, 2]"  # another engine alive when it claimed: disjoint from [0]
    assert claim_cores(CPUOptions(share="shared"), [0, 1, 2, 3], claims) == [0, 1, 2]  # shared: not recorded


def test_available_cores_follow_affinity_and_cgroup_quota(tmp_path):
    mine = sorted(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")
    assert available_cores(cpu_max) == mine
    cpu_max.write_text("50000 100000\n")  # half a core: still one
    assert available_cores(cpu_max) == mine[:1]
    assert available_cores(tmp_path / "absent") == mine


def test_core_list_is_vllms_bind_syntax():
    assert core_list([0, 1, 5]) == "0,1,5"


def test_options_survive_the_trip_to_the_replica():
    """The builder hands each replica its spec as a full dump: every field is then set."""
    options = CPUOptions(omp_threads_bind="0")
    assert CPUOptions.model_validate(options.model_dump()) == options


def test_niceness_is_only_ever_raised():
    code = ("import os; from app.cpu import raise_niceness; os.nice(5); raise_niceness(3); a = os.nice(0); "
            "raise_niceness(8); print(a, os.nice(0))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=os.getcwd())
    assert out.stdout.split() == ["5", "8"]
