"""scripts/bench.py's cases of the metric, pair, class-batch and memory learners (scripts/bench_cases/metric.py,
memory.py): each package learner, built from its config and stepped on its own batch source's batch, against a
plain reference on the same weights and batch.  What is checked is the first step's loss and gradients; not
how fast anything is (the timings of a tiny run mean nothing)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"


def run_bench(tmp_path, cases: str):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench.py"), "--cases", cases, "--tiny", "--iters", "1",
                           "--warmup", "0", "--threads", "1", "--devices", "cpu", "--json", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    rows = json.loads(out.read_text())
    assert [r["name"] for r in rows] == cases.split(",")
    return rows


def assert_matches_reference(row):
    """The package's loss and gradients equal the plain reference's: in float64 to rounding (the same function:
    measured 0 to 1.2e-15 in the loss, 7e-16 to 4.6e-14 in the gradients), in fp32 within 1e-4 in the loss
    (measured 0 to 2.8e-7).  The fp32 gradients against the float64 reference's: measured 6e-7 to 4.9e-6
    for the package, so within 2e-5; the plain reference's own fp32 error is only reported (1.6e-6, and 1.1e-4
    for Relation Networks, whose NCHW 128 -> 64 relation convolution's fp32 gradients are that far off)."""
    name = row["name"]
    assert "equals the reference's" in row["check_note"], (name, row["check_note"])  # the same batch on both sides
    assert 0.0 <= row["loss_rel_err"] <= 1e-4, (name, row["loss_rel_err"])
    assert 0.0 <= row["loss_rel_err_fp64"] <= 1e-10, (name, row["loss_rel_err_fp64"])
    assert 0.0 <= row["grad_rel_err_fp64"] <= 1e-10, (name, row["grad_rel_err_fp64"])
    assert 0.0 < row["ref_grad_rel_err"] < 1e-3, (name, row["ref_grad_rel_err"])  # (fp32 really ran in fp32)
    assert 0.0 <= row["grad_rel_err"] <= 2e-5, (name, row["grad_rel_err"])


def assert_row(row):
    """A result row of scripts/bench.py: the checks above, timings, and which paths were compared."""
    assert_matches_reference(row)
    for k in ("ms_per_it", "ref_ms_per_it", "speedup"):
        assert isinstance(row[k], float) and row[k] > 0, (row["name"], k)
    assert row["fast_path"].startswith(f"package {row['name'].split('_')[0]} ") and row["reference"]


def test_matchingnet_check_matches_an_easyfsl_style_reference_on_the_same_episode():
    """The plugin's check alone, in one process (the default tier's budget): Matching Networks 5-way 1-shot."""
    assert_matches_reference({"name": "matchingnet_5w1s", **check_with_reference("matchingnet_5w1s", "")})


@pytest.mark.slow  # (about 20 s of CPU: three processes)
def test_bench_matchingnet_case_writes_a_row_that_matches_its_reference(tmp_path):
    (row,) = run_bench(tmp_path, "matchingnet_5w1s")
    assert_row(row)
    assert row["meta_batch"] == 1 and (row["n_way"], row["n_shot"], row["n_query"]) == (5, 1, 15)


@pytest.mark.slow  # (about 2 minutes of CPU: three processes per case)
def test_bench_relationnet_siamese_baselines_and_fce_match_their_plain_references(tmp_path):
    cases = "matchingnet_fce_5w1s,relationnet_5w1s_19q,siamese_pairs128,baseline_b16,baselinepp_b16"
    for row in run_bench(tmp_path, cases):
        assert_row(row)


@pytest.mark.slow  # (about 25 s of CPU)
def test_bench_mann_matches_a_plain_recurrence_of_the_paper(tmp_path):
    (row,) = run_bench(tmp_path, "mann_5w10i_b16")
    assert_row(row)
    assert row["meta_batch"] == 2  # --tiny: 2 sequences of 50 steps


def check_with_reference(case: str, patch: str) -> dict:
    """bench_cases' check of ``case`` after ``patch`` (Python run first in the child, with ``metric``,
    ``memory`` and ``torch`` imported) -- the child runs in scripts/, where bench.py's plugins import."""
    code = ("import json, torch, bench; bench.plugins(); torch.set_num_threads(1)\n"
            "from bench_cases import metric, memory\n" + patch + "\n"
            f"case = bench.CASE_BY_NAME[{case!r}]\n"
            "module = metric if case.workload in metric.WORKLOADS else memory\n"
            "print('CHECK ' + json.dumps(module.check(case, tiny=True)))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=SCRIPTS, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("CHECK "))
    return json.loads(line[len("CHECK "):])


@pytest.mark.slow  # (about 6 s of CPU)
def test_bench_check_catches_a_reference_that_computes_another_function():
    """The check has teeth: Baseline++'s reference with the cosine scale 2 instead of the authors' 10 for its
    4112 classes is off in the loss and in the gradients, in fp32 and in float64."""
    patch = ("import dataclasses\n"
             "real = metric.baseline_reference\n"
             "def wrong(case):\n"
             "    ref = real(case)\n"
             "    ref.classifier.scale_factor = 2\n"
             "    return ref\n"
             "metric.WORKLOADS['baselinepp'] = dataclasses.replace(metric.WORKLOADS['baselinepp'], reference=wrong)\n")
    out = check_with_reference("baselinepp_b16", patch)
    assert out["loss_rel_err"] > 1e-2 and out["loss_rel_err_fp64"] > 1e-2, out
    assert out["grad_rel_err_fp64"] > 1e-2, out
