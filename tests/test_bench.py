"""scripts/bench.py end to end on tiny settings: what it writes, not how fast anything is."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

FLOAT_KEYS = ("ms_per_it", "ref_ms_per_it", "ref_glibc_ms_per_it", "speedup", "speedup_vs_glibc_ref",
              "tasks_per_s", "peak_mem_mb", "ref_peak_mem_mb")


def run_bench(tmp_path, *args):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), *args, "--json", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    return proc, out


def test_bench_writes_one_record_per_case_with_timings_memory_and_gradient_error(tmp_path):
    proc, out = run_bench(tmp_path, "--cases", "sampler,maml_5w1s_mb32_1step", "--iters", "2", "--warmup", "1",
                          "--tiny", "--devices", "cpu", "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    for needle in ("CPU:", "torch", "threads", "maml_5w1s_mb32_1step", "speed-up"):
        assert needle in proc.stdout
    rows = json.loads(out.read_text())
    assert [(r["name"], r["device"]) for r in rows] == [("sampler", "cpu"), ("maml_5w1s_mb32_1step", "cpu")]
    for r in rows:
        for k in FLOAT_KEYS:
            assert isinstance(r[k], float) and r[k] > 0, (r["name"], k, r[k])
        assert len(r["times_ms"]) == 2 and len(r["ref_times_ms"]) == 2 and len(r["ref_glibc_times_ms"]) == 2
        assert r["ms_iqr"][0] <= r["ms_per_it"] <= r["ms_iqr"][1]
    sampler, maml = rows
    assert sampler["grad_rel_err"] is None
    assert maml["meta_batch"] == 2 and maml["fused_ops"] in ("on", "off")
    assert "fp64" in maml["grad_check"]
    # The fast path's fp32 meta-gradient against the float64 plain reference.  In fp32 a rounding difference
    # can flip a ReLU / max-pool kink (FIELD_NOTES), so the yardstick is the plain reference's own fp32 error
    # on the same weights and task (measured here: 2.1e-6; the fast path 2.0e-6 with the C++ kernels, 2.6e-6
    # on the torch-ops fallback): at most 4x that plus 2e-6 of summation-order noise, ~1e-5.  The yardstick
    # itself is held under 1e-5, so the bound never grows past 4.2e-5: a 1e-4 error always fails.
    err, ref_err = maml["grad_rel_err"], maml["ref_grad_rel_err"]
    assert isinstance(err, float) and isinstance(ref_err, float)
    assert 0.0 < ref_err < 1e-5, f"the plain reference's own fp32 error {ref_err:.3g} is no yardstick"
    assert 0.0 <= err <= 4 * ref_err + 2e-6, f"fast-path fp32 gradient error {err:.3g} (reference's own {ref_err:.3g})"
    # float64: the fast path's implementation is exact (measured 7e-15 with the kernels, 8e-15 on the fallback)
    err64 = maml["grad_rel_err_fp64"]
    assert isinstance(err64, float) and 0.0 <= err64 <= 1e-12, f"fast-path fp64 gradient error {err64!r}"


@pytest.mark.slow
def test_bench_anil_and_metasgd_cases_check_their_meta_gradients_against_a_plain_reference(tmp_path):
    """The MAML family's bench cases: the plain reference adapts the head alone (ANIL) or scales each weight's
    step by its own rate (Meta-SGD, the rates' gradients compared too); float64 exact, fp32 at the
    reference's own error."""
    proc, out = run_bench(tmp_path, "--cases", "anil_5w1s_mb32_1step,metasgd_5w1s_mb32_1step", "--iters", "1",
                          "--warmup", "0", "--tiny", "--devices", "cpu", "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    rows = json.loads(out.read_text())
    assert [r["name"] for r in rows] == ["anil_5w1s_mb32_1step", "metasgd_5w1s_mb32_1step"]
    for r in rows:
        assert 0.0 <= r["grad_rel_err_fp64"] <= 1e-12, (r["name"], r["grad_rel_err_fp64"])
        assert 0.0 <= r["grad_rel_err"] <= 4 * r["ref_grad_rel_err"] + 2e-6, (r["name"], r["grad_rel_err"])
        assert r["fast_path"].startswith(f"package {r['name'].split('_')[0]} ")


def test_bench_rejects_an_unknown_case_by_name(tmp_path):
    proc, out = run_bench(tmp_path, "--cases", "maml_typo", "--iters", "1")
    assert proc.returncode == 2 and "unknown case(s) maml_typo" in proc.stdout
    assert not out.exists()


@pytest.mark.slow  # (the default tier's time: a benchmark option, 15 s)
def test_bench_memory_cap_chunks_the_fast_path_and_cuda_graphs_need_cuda(tmp_path):
    proc, out = run_bench(tmp_path, "--cases", "maml_5w1s_mb32_1step", "--iters", "1", "--warmup", "0", "--tiny",
                          "--devices", "cpu", "--threads", "1", "--no-check", "--memory-cap-mb", "20")
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    (row,) = json.loads(out.read_text())
    assert row["memory_cap_mb"] == 20.0 and row["task_chunk"] == 1  # one 5w1s 15-query task: ~14-16 MiB saved
    assert row["cuda_graphs"] is False
    bad, _ = run_bench(tmp_path, "--cuda-graphs", "--devices", "cpu")
    assert bad.returncode == 2 and "--cuda-graphs needs --devices cuda" in bad.stderr


@pytest.mark.slow  # (the default tier's time: a profiling script, 13 s)
def test_step_time_prints_one_row_per_setting_and_names_a_failing_one(tmp_path):
    script = str(REPO / "scripts" / "step_time.py")
    common = ["--backbone", "conv4_strided", "--n-query", "1", "--tasks", "2", "--warmup", "0", "--iters", "1",
              "--threads", "1"]
    proc = subprocess.run([sys.executable, script, *common, "device.batch_tasks=off", "device.batch_tasks=on"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "device.batch_tasks=off" in proc.stdout and "device.batch_tasks=on" in proc.stdout
    assert "1.00x" in proc.stdout  # the first setting against itself
    bad = subprocess.run([sys.executable, script, *common, "device.batch_tasks=maybe"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "setting 'device.batch_tasks=maybe' failed" in bad.stderr


def test_bench_ops_stem_prints_a_row_per_batch_and_workload(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_ops.py"), "--stem", "--reps", "1",
                           "--threads", "1"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [ln for ln in proc.stdout.splitlines() if ln.rstrip().endswith("x") and "images" in ln]
    assert len(rows) == 9, proc.stdout
    for batch in ("MAML query 75 images", "MAML support 5 images", "ProtoNet 360 images"):
        assert sum(ln.startswith(batch) for ln in rows) == 3


def test_bench_conv_checks_its_reformulations_and_prints_a_row_per_call(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_conv.py"), "--batch", "3", "--size", "6",
                           "--channels", "8", "--iters", "1", "--threads", "1"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for call in ("forward", "backward, weight gradient", "im2col + mm", "9 shifted mms", "flipped weights"):
        assert call in proc.stdout, proc.stdout
