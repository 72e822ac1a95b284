"""scripts/ci_check.py reads pytest's output: its summary line and the slowest tests."""

from __future__ import annotations

from conftest import import_script

OUTPUT = """
============================= slowest 25 durations =============================
143.20s call     tests/test_cpu_ray_platform.py::test_app_serves_through_an_engine_whose_workers_span_two_ray_nodes
62.01s setup    tests/test_openai_api.py::test_models_lists_both_with_backend_and_context
=========================== short test summary info ============================
SKIPPED [2] tests/test_kuberay.py:226: ../shared/kuberay-crds not found
================= 515 passed, 2 skipped in 1262.54s (0:21:02) ==================
"""


def test_summary_and_slowest_tests_are_read():
    ci_check = import_script("ci_check")
    assert ci_check.SUMMARY.findall(OUTPUT) == ["515 passed, 2 skipped"]
    assert [m[0] for m in ci_check.SLOW.findall(OUTPUT)] == ["143.20", "62.01"]


def test_a_failed_run_is_summarised_too():
    ci_check = import_script("ci_check")
    assert ci_check.SUMMARY.findall("==== 1 failed, 514 passed in 900.00s (0:15:00) ====") == ["1 failed, 514 passed"]
