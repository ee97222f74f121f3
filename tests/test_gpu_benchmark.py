"""benchmarks/gpu_throughput.py runs on GPUs only; here: its log parsing and --dry-run (the full CPU
smoke test is `python benchmarks/gpu_throughput.py --device cpu --tiny`, minutes on 2 cores)."""

import importlib.util
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_throughput.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("gpu_throughput", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_window_rates_from_logs(bench):
    # ours: cumulative rates; 1M tokens/step; steps take 10 s (compile), then 1 s each
    t = {1: 10.0, 2: 11.0, 3: 12.0, 4: 13.0}
    ours = "\n".join(f"step {k}/4 | loss 1.0 | lr 1e-3 | gnorm 1.0 | {k * 10**6 / t[k]:,.0f} tok/s | tokens {k * 10**6:,} | ETA 0:00:01"
                     for k in t)
    assert bench.ours_window_rate(ours, 10**6, warmup=1) == pytest.approx(10**6, rel=1e-5)
    lit = "\n".join(f"Epoch 1 | iter {k} step {k} | loss train: 1.000, val: n/a | iter time: {ms:.2f} ms (step)"
                    for k, ms in {1: 9000.0, 2: 500.0, 3: 500.0}.items())
    assert bench.litgpt_window_rate(lit, 1000, warmup=1) == pytest.approx(2000.0)
    with pytest.raises(ValueError, match="need step 5"):
        bench.ours_window_rate(ours, 1000, warmup=5)
    with pytest.raises(ValueError, match="no litgpt `iter time` lines"):
        bench.litgpt_window_rate("nothing", 1000, warmup=1)


def test_dry_run_writes_both_configs(bench, capsys):
    bench.main(["--dry-run"])
    out = capsys.readouterr().out
    for name in ("pythia-160m", "pythia-410m"):
        assert f"# {name} / ours: " in out and f"# {name} / litgpt: " in out
    assert "max_seq_length: 2048" in out and "precision: bf16-true" in out
    assert "# MoE: 8 experts top-2" in out
