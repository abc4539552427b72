"""`blockattn bench` runs end to end at a tiny size: table, PNG and markdown section."""
import os

from blockattn.bench.machine import cpu_description, native_dtypes
from blockattn.cli import main

TINY = ["--lengths", "128", "--backends", "torch", "--no-flex", "--repeats", "1", "--gemm-size", "256"]


def test_bench_writes_table_plot_and_record(tmp_path, capsys):
    record, plot = tmp_path / "B.md", tmp_path / "e.png"
    record.write_text("# Benchmarks\n\nkept text\n")
    assert main(["bench", *TINY, "--families", "causal", "random-10%", "--dtype", "fp32", "bf16",
                 "--record", str(record), "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "| fp32 | causal | 128 | torch | fwd |" in out and "| fp32 | random-10% | 128 | torch | fwd |" in out
    assert "| bf16 | causal | 128 | torch | fwd |" in out and "of GEMM peak" in out
    assert cpu_description() in out
    text = record.read_text()
    assert "kept text" in text and "<!-- bench-engine-fwd -->" in text and "| fp32 | causal | 128 | torch |" in text
    assert plot.read_bytes()[:4] == b"\x89PNG"
    # a second run replaces the section instead of appending another
    main(["bench", *TINY, "--families", "causal", "--dtype", "fp32", "--record", str(record), "--plot", ""])
    assert record.read_text().count("<!-- bench-engine-fwd -->") == 1


def test_bench_writes_no_file_unless_asked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", *TINY, "--families", "causal", "--plot", ""]) == 0
    assert os.listdir(tmp_path) == []
    out = capsys.readouterr().out
    for dtype in native_dtypes():  # the default: every dtype this CPU has units for
        assert f"| {dtype} | causal | 128 | torch |" in out
