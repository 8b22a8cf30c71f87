"""`medha simulate`: runs every listed policy on one workload, prints one table, writes JSON
and plots, and reports bad input without a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medha.cli import main
from medha.sim.traces import BUNDLED_DIR, TRACES_ENV

SMALL = ["simulate", "--hardware", "h100", "--tp", "8", "--num-requests", "40", "--qps", "4"]


@pytest.fixture(autouse=True)
def bundled_traces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TRACES_ENV, str(BUNDLED_DIR))


def test_simulate_prints_one_row_per_policy_and_writes_the_same_numbers_as_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results" / "run.json"
    args = [*SMALL, "--policy", "lars,fcfs,fcfs-chunked:2048", "--long-fraction", "0.05"]
    assert main([*args, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    for spec in ("lars", "fcfs", "fcfs-chunked:2048"):
        assert spec in printed
    assert "TTFT" in printed and "TPOT" in printed and "deadline" in printed
    data = json.loads(out.read_text())
    assert data["setup"]["gpus"] == 8 and data["setup"]["num_requests"] == 40
    assert list(data["policies"]) == ["lars", "fcfs", "fcfs-chunked:2048"]
    lars = data["policies"]["lars"]
    assert lars["all"]["requests"] == 40 and lars["rejected"] == 0
    assert set(lars["by_label"]) == {"short", "long"}
    assert lars["by_label"]["long"]["requests"] == 2
    for key in ("ttft_p50", "ttft_p90", "ttft_p99", "tpot_p99", "e2e_p50", "e2e_p99"):
        assert lars["all"][key] > 0
    assert f"{lars['all']['ttft_p50']:.3g}" in printed  # the table shows the JSON's numbers


def test_simulate_reads_a_workload_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = tmp_path / "w.csv"
    csv.write_text("arrival_time,prompt_tokens,output_tokens,deadline\n0,500,8,\n0.1,900,4,0.2\n")
    out = tmp_path / "w.json"
    assert main(["simulate", "--trace", str(csv), "--policy", "edf", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["policies"]["edf"]["all"]["requests"] == 2
    assert data["setup"]["workload"] == f"trace {csv}"


def test_simulate_writes_ttft_cdf_and_chunk_size_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    args = [*SMALL, "--policy", "lars,fcfs", "--long-fraction", "0.05", "--plot", str(tmp_path)]
    assert main(args) == 0
    for name in ("ttft_cdf.png", "ttft_cdf_short.png", "chunk_sizes.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--policy", "sjf"], "unknown policy 'sjf'"),
        (["--policy", "lars:64"], "only fcfs-chunked takes a chunk size"),
        (["--tp", "3"], "tp=3 does not divide"),
        (["--pp", "99"], "pp=99 exceeds the model's 32 layers"),
        (["--kvp", "2", "--max-tokens-per-kvp-group", "5"], "must be a multiple of block_size"),
    ],
)
def test_bad_settings_are_reported_in_one_line(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*SMALL, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medha: error:") and err.count("\n") == 1 and message in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--target-batch-time", "0"], "argument --target-batch-time: must be a finite number"),
        (["--fixed-chunk", "0"], "argument --fixed-chunk: must be >= 1"),
        (["--long-fraction", "2"], "argument --long-fraction: must be between 0 and 1"),
        (["--num-requests", "-1"], "argument --num-requests: must be >= 1"),
        (["--qps", "inf"], "argument --qps: must be a finite number > 0"),
        (["--json", ""], "argument --json: an empty path"),
    ],
)
def test_bad_values_are_refused_before_anything_runs(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*SMALL, *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_output_paths_are_checked_before_the_simulation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from medha.sim import runs

    def no_simulation(*args: object, **kwargs: object) -> None:
        raise AssertionError("simulated before checking where the results go")

    monkeypatch.setattr(runs, "run_policies", no_simulation)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main([*SMALL, "--json", str(tmp_path)]) == 2
    assert "it is a folder" in capsys.readouterr().err
    assert main([*SMALL, "--plot", str(blocker / "plots")]) == 2
    assert f"cannot create the folder {blocker}" in capsys.readouterr().err


def test_qps_does_not_apply_to_a_csv_trace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = tmp_path / "w.csv"
    csv.write_text("arrival_time,prompt_tokens,output_tokens\n0,5,1\n")
    assert main(["simulate", "--trace", str(csv), "--qps", "2"]) == 2
    assert "--qps" in capsys.readouterr().err
    assert main(["simulate", "--trace", str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv" in capsys.readouterr().err


def test_a_model_whose_weights_leave_no_room_for_a_kv_cache_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Llama-3-70B in bf16 is 140 GB: one 80 GB A100 has no memory left for its KV cache.
    argv = ["simulate", "--model", "llama-3-70b", "--hardware", "a100", "--num-requests", "5"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no memory left for the KV cache" in err and "Traceback" not in err
