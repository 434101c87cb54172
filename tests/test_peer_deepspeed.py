"""Cross-check against a peer: DeepSpeed's MoE layer (CPU, one gloo process), given our weights,
computes the same outputs and input gradients as our MoE layer in dropless mode."""

from types import SimpleNamespace

import pytest
import torch

from dynamoe.config import MoEConfig, RouterConfig
from dynamoe.layers.moe_layer import MoELayer


@pytest.fixture(scope="module")
def deepspeed():
    from dynamoe.evals.bench_moe_layer import init_deepspeed

    return init_deepspeed()


@pytest.mark.parametrize("top_k", [1, 2])
def test_deepspeed_moe_matches_ours_dropless(deepspeed, top_k):
    from dynamoe.evals.bench_moe_layer import build_deepspeed

    torch.manual_seed(top_k)
    T, d, f, E = 64, 32, 48, 4
    ours = MoELayer(MoEConfig(num_experts=E, d_expert=f, router=RouterConfig(top_k=top_k)), d_model=d)
    theirs = build_deepspeed(deepspeed, ours, SimpleNamespace(d_model=d, d_ff=f, experts=E, top_k=top_k), None)
    x = torch.randn(T, d)
    x_ours = x.clone().requires_grad_(True)
    x_theirs = x.clone().requires_grad_(True)
    y_ours, aux = ours(x_ours)
    y_theirs, _, exp_counts = theirs(x_theirs.unsqueeze(0))
    y_theirs = y_theirs.squeeze(0)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-6)
    if top_k == 1:  # DeepSpeed reports top-1 counts
        torch.testing.assert_close(aux.counts, exp_counts.to(aux.counts.dtype))
    g = torch.randn(T, d)
    (y_ours * g).sum().backward()
    (y_theirs * g).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=1e-5, atol=1e-6)


def test_layer_benchmark_writes_its_table_as_json(deepspeed, tmp_path, capsys):
    import json

    from dynamoe.evals.bench_moe_layer import main

    out = tmp_path / "bench.json"
    result = main(
        [
            "--tokens",
            "64",
            "--d-model",
            "32",
            "--d-ff",
            "32",
            "--experts",
            "4",
            "--iters",
            "2",
            "--warmup",
            "1",
            "--threads",
            "1",
            "--json",
            str(out),
        ]
    )
    saved = json.loads(out.read_text())
    assert saved["rows"] == result["rows"]
    assert [r["name"] for r in saved["rows"]][:2] == ["dynamoe dropless", "deepspeed dropless"]
    assert all(r["median_ms"] > 0 for r in saved["rows"])
    assert saved["hardware"]["torch"] and saved["flops"]["total_fwd_bwd"] == 3 * (
        2 * 64 * 2 * 32 * 32 * 2 + 2 * 64 * 32 * 4
    )
    assert "faster than DeepSpeed dropless" in capsys.readouterr().out
