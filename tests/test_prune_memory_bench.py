"""benchmarks/prune_memory.py: prune's peak memory against the weights, one model per process."""

from benchmark_module import load_benchmark

bench = load_benchmark("prune_memory")


def test_prune_memory_row(capsys):
    assert bench.main(["--models", "tv:squeezenet1_1", "tv:nosuchmodel"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| model | weights GB |")
    row = next(l for l in lines if l.startswith("| tv:squeezenet1_1 |")).split("|")
    weights, start, peak = float(row[2]), float(row[3]), float(row[4])
    assert 0.004 < weights < 0.006 and peak >= start > 0  # 1.2 M float32 parameters
    assert float(row[5].strip().rstrip("x")) < 10  # a few copies of the weights, not tens
    assert int(row[7].replace(",", "")) < 1_235_496  # prune removed structures
    assert "failed" in next(l for l in lines if l.startswith("| tv:nosuchmodel |"))
