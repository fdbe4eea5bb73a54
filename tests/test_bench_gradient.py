"""scripts/bench.py's Reptile, MAML++ and LSTM meta-learner cases (scripts/bench_cases/gradient.py) end to end on
tiny settings: each package learner, built from the configs and stepped as the training loop steps it, against a
plain reference written the usual way, on the same weights and tasks.  What is checked is what the cases compare
(Reptile: the update theta' - theta of one outer step; MAML++ and the LSTM meta-learner: the meta-gradient of
every meta-parameter), never how fast anything is."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Float64: two independent implementations of the same math agree to rounding (measured 2e-14 to 5e-14).
FP64_BOUND = 1e-12
# The plain reference's own fp32 error against its float64 twin is the yardstick of an fp32 result on the same
# ReLU / max-pool net (FIELD_NOTES: rounding can flip a kink, for any fp32 implementation).  Measured on these
# tiny runs: Reptile 3.9e-5 (SGD) / 4.7e-5 (Adam), MAML++ 7.0e-5, LSTM meta-learner 9.5e-6; the package's own
# 3.8e-5 / 4.5e-5 / 6.8e-5 (5.6e-6 grouped) / 3.1e-6.  The bound: 4x the yardstick plus 2e-6 of summation-order
# noise, the yardstick itself held under 2e-4, so it never passes 8.1e-4; a wrong batch-norm row, rate, loss
# weight or gate is off by percents.
YARDSTICK_MAX = 2e-4


def run_bench(tmp_path, cases: str):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--cases", cases, "--tiny", "--iters",
                           "1", "--warmup", "0", "--threads", "1", "--devices", "cpu", "--json", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    rows = json.loads(out.read_text())
    assert [r["name"] for r in rows] == cases.split(",")
    return rows


def assert_checked(row: dict) -> None:
    name = row["name"]
    err64 = row["grad_rel_err_fp64"]
    assert isinstance(err64, float) and 0.0 <= err64 <= FP64_BOUND, (name, err64)
    err, ref_err = row["grad_rel_err"], row["ref_grad_rel_err"]
    assert 0.0 < ref_err < YARDSTICK_MAX, f"{name}: the reference's own fp32 error {ref_err:.3g} is no yardstick"
    assert 0.0 <= err <= 4 * ref_err + 2e-6, f"{name}: fp32 error {err:.3g} (the reference's own {ref_err:.3g})"
    for k in ("ms_per_it", "ref_ms_per_it", "speedup"):
        assert isinstance(row[k], float) and row[k] > 0, (name, k)
    assert row["fast_path"].startswith(f"package {name.split('_5w')[0]} "), row["fast_path"]
    assert row["reference"] and "fp64" in row["grad_check"]


def test_bench_reptile_case_matches_the_paper_style_update_in_float64(tmp_path):
    """Reptile's own outer step (grouped convolutions under device.batch_tasks=auto) against the per-task SGD
    loop of the paper's code: the same update of every weight after one outer step (eps annealed to 0.75)."""
    (row,) = run_bench(tmp_path, "reptile_5w1s_mb5_strided")
    assert_checked(row)
    assert "update theta' - theta" in row["grad_check"] and row["grad_check_tasks"] == 2
    assert row["task_mode"] == "groups" and row["meta_batch"] == 2 and row["n_query"] == 9


SLOW_CASES = {  # case: (its task mode, what its check compares)
    "reptile_5w1s_mb5_strided_adam": ("off", "update theta' - theta"),  # (a carried Adam state: tasks in order)
    "mamlpp_5w1s_mb8_5step_1q": ("off", "meta-gradient"),  # per-step running statistics: the per-task loop
    "mamlpp_5w1s_mb8_5step_1q_nobnrs": ("groups", "meta-gradient"),  # without them: grouped convolutions
    "meta_lstm_5w1s_12step": (None, "meta-gradient"),
}


@pytest.mark.slow  # (each a tiny bench run, 3 processes: 15-40 s on a quiet core, the LSTM meta-learner's the longest)
@pytest.mark.parametrize("case", list(SLOW_CASES))
def test_bench_case_checks_against_its_plain_reference(tmp_path, case):
    """Reptile with the paper's carried inner Adam (its update), MAML++ (per-step batch-norm rows and rates,
    multi-step loss, second order; with and without the per-step running statistics) and the LSTM meta-learner
    (its meta-gradient through the coordinate-wise LSTM, every LSTM weight and c_0): float64 exact, fp32 at the
    reference's own error."""
    (row,) = run_bench(tmp_path, case)
    assert_checked(row)
    mode, compared = SLOW_CASES[case]
    assert row.get("task_mode") == mode and compared in row["grad_check"], (row.get("task_mode"), row["grad_check"])
    if case.endswith("_adam"):
        assert "Adam" in row["check_note"]
