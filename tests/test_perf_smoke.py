"""The benchmark runs end to end in a tiny configuration, so it cannot rot unnoticed."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "perf"))

import quality  # noqa: E402
import step_bench  # noqa: E402


def test_step_bench_runs_end_to_end(capsys):
    assert step_bench.main(["--blocks", "0", "--rounds", "1", "--steps", "2", "--warmup", "1"]) == 0
    table = capsys.readouterr().out
    for row in ("qhfast QHAdam fp32 per-tensor", "torch Adam fp32 fused", "qhoptim 1.1.0 QHM fp32"):
        assert f"| {row}" in table
    # exact state sizes: two fp32 moments; bf16 params add an fp32 master; QHM one fp32 buffer
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    bytes_per_param = lambda row: float(rows[row].rstrip(" |").split(" | ")[-1])  # noqa: E731
    assert round(bytes_per_param("qhfast QHAdam fp32 per-tensor (default)")) == 8
    assert round(bytes_per_param("qhfast QHAdam bf16 per-tensor (default)")) == 12
    assert round(bytes_per_param("qhfast QHAdam bf16 no-masters per-tensor (default)")) == 8
    assert round(bytes_per_param("qhfast QHM fp32 per-tensor (default)")) == 4


def test_quality_runs_end_to_end(capsys, tmp_path):
    assert quality.main(["--steps", "3", "--plot", str(tmp_path / "q.png")]) == 0
    table = capsys.readouterr().out
    assert sum(line.startswith("| qhfast") or line.startswith("| torch") for line in table.splitlines()) == 5


def test_compare_runs_end_to_end(capsys):
    import compare

    assert compare.main(["--rev", "HEAD", "--blocks", "0", "--rounds", "1", "--steps", "2",
                         "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    for name in ("qhfast@HEAD", "qhfast (working tree)", "torch Adam loop"):
        assert name in out
