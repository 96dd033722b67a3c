"""scripts/check_gpu.py's CPU mode: every section runs at tiny sizes, writes the JSON and the
summary, and marks the checks only a GPU can make as not run."""

import json

import pytest

from moejax.tools import gpu_check
from moejax.tools.gpu_check import NOT_RUN, REPORT_JSON, SUMMARY_MD


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    report = gpu_check.run_checks(out, log=lambda line: None)
    return report, json.loads((out / REPORT_JSON).read_text()), (out / SUMMARY_MD).read_text()


def test_every_section_runs_on_cpu_and_is_timed(cpu_report):
    report, written, _ = cpu_report
    assert written["platform"] == "cpu"
    assert set(written["sections"]) == {"fp8", "mfu", "dropless", "attention", "memory"}
    for name, section in written["sections"].items():
        assert "error" not in section, (name, section.get("error"))
        assert section["seconds"] > 0
    mfu_rows = written["sections"]["mfu"]["rows"]
    assert list(gpu_check.MFU_ROWS) == list(mfu_rows)
    timed = [mfu_rows[label] for label in gpu_check.CPU_SIZES.mfu_rows]
    assert timed and all(row["tokens_per_second"] > 0 for row in timed)
    layers = written["sections"]["dropless"]["layers"]
    assert [row["shape"].split(" (")[0] for row in layers] == ["coarse", "fine-grained"]
    assert written["sections"]["fp8"]["cublas_fp8"]["fp8_dots_lowered"] > 0
    # the dropless fp8 step: every expert GEMM role (gate, up, down x fprop, dgrad, wgrad)
    roles = written["sections"]["fp8"]["dropless_fp8"]["expert_fp8_dots_by_role"]
    assert len(roles) == 9 and min(roles.values()) >= 1
    assert written["sections"]["dropless"]["ragged_all_to_all"]["lowers"] is True
    # attention kernels: the blockwise one keeps fewer temporaries than the [T, T] scores
    attention = written["sections"]["attention"]["rows"][0]
    assert attention["blockwise"]["temp_bytes"] < attention["materialised"]["temp_bytes"]
    assert attention["cudnn"] == NOT_RUN
    assert written["sections"]["memory"]["planned_bytes"]["total"] > 0
    assert written["total_seconds"] == pytest.approx(report["total_seconds"])


def test_gpu_only_checks_are_marked_not_run(cpu_report):
    _, written, summary = cpu_report
    s = written["sections"]
    assert s["fp8"]["cublas_fp8"]["cublas_fp8_calls"] == NOT_RUN
    assert s["mfu"]["spec_bf16_peak_tflops"] == NOT_RUN
    assert all(row == NOT_RUN or row["mfu_vs_spec_peak"] == NOT_RUN
               for row in s["mfu"]["rows"].values())
    assert s["dropless"]["ragged_all_to_all"]["executes_and_matches"] == NOT_RUN
    assert s["memory"]["peak_bytes_in_use"] == NOT_RUN
    assert s["memory"]["compiled_memory_analysis_bytes"]["total"] > 0
    assert {g["met"] for g in written["goals_measured"].values()} == {NOT_RUN}
    for heading in ("## fp8", "## mfu", "## dropless", "## attention", "## memory", "| goal |"):
        assert heading in summary
    assert NOT_RUN in summary


def test_a_failing_section_records_its_error_and_the_others_run(tmp_path, monkeypatch):
    def broken(sizes, context):
        raise RuntimeError("fp8 broke")

    quiet = {name: (lambda sizes, context: {"ok": True}) for name in gpu_check.SECTIONS}
    monkeypatch.setattr(gpu_check, "SECTIONS", {**quiet, "fp8": broken})
    gpu_check.run_checks(tmp_path, log=lambda line: None)
    sections = json.loads((tmp_path / REPORT_JSON).read_text())["sections"]
    assert "RuntimeError: fp8 broke" in sections["fp8"]["error"]
    assert all(sections[name]["ok"] for name in ("mfu", "dropless", "memory"))
    assert "error: RuntimeError: fp8 broke" in (tmp_path / SUMMARY_MD).read_text()


@pytest.mark.parametrize("kind, bf16", [("NVIDIA H200", 989e12), ("NVIDIA H100 80GB HBM3", 989e12),
                                        ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200 NVL", 835e12),
                                        ("cpu", None)])
def test_spec_peak_by_device_kind(kind, bf16):
    assert gpu_check.spec_peak_flops(kind)[0] == bf16
