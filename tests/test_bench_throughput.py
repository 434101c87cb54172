"""``moe bench throughput`` runs real short trainings and reports each cell of its table."""

import json


def test_throughput_bench_runs_every_cell_and_writes_json(tmp_path, monkeypatch, capsys):
    import dynamoe.evals.bench_throughput as bench

    monkeypatch.setitem(bench.MODELS, "tiny", ("debug_tiny", ["train.batch_size=2"], 4))
    out = tmp_path / "throughput.json"
    bench.main(["--models", "tiny", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    cells = {(r["precision"], r["activation_checkpointing"]) for r in rows}
    assert cells == {("fp32", "none"), ("fp32", "blocks"), ("bf16", "none"), ("bf16", "blocks")}
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["peak_memory_mib"] > 100 and r["tokens_per_step"] == 2 * 32
    table = capsys.readouterr().out
    assert "tokens/s" in table and table.count("tiny ") >= 4
