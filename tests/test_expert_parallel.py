"""Expert parallelism on gloo: sharded experts and all-to-all reproduce one device exactly."""

import pytest
import torch

from dist_helper import run_workers

pytestmark = pytest.mark.distributed


def _layer(seed: int, num_experts: int, top_k: int, capacity_factor=None, activation="gelu"):
    from dynamoe.config import MoEConfig, RouterConfig
    from dynamoe.layers.moe_layer import MoELayer

    torch.manual_seed(seed)
    cfg = MoEConfig(
        num_experts=num_experts,
        d_expert=12,
        activation=activation,
        # Router losses are means over each rank's own tokens (as in DeepSpeed and Megatron),
        # so they are left out of this one-device comparison.
        router=RouterConfig(top_k=top_k, capacity_factor=capacity_factor, aux_loss_coef=0.0),
    )
    return MoELayer(cfg, d_model=8).double()


def _inputs(T: int, starve: bool):
    gen = torch.Generator().manual_seed(123)
    x = torch.randn(T, 8, generator=gen, dtype=torch.float64)
    if starve:  # every token's first feature is >= 1, so a gate row of (-100, 0, ...) is never chosen
        x[:, 0] = x[:, 0].abs() + 1
    g = torch.randn(T, 8, generator=gen, dtype=torch.float64)
    return x, g


@torch.no_grad()
def _starve_expert_0(layer):
    """Expert 0 (all of rank 0's experts when E = P) gets no token from ``_inputs(starve=True)``."""
    layer.router.gate.weight[0] = 0.0
    layer.router.gate.weight[0, 0] = -100.0


def _forward_backward(layer, x, g):
    x = x.clone().requires_grad_(True)
    y, aux = layer(x)
    (y * g).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    return y.detach(), x.grad, grads, aux.counts


def _ep_worker(rank, world, num_experts, top_k, capacity_factor, starve, activation):
    import torch.distributed as dist

    from dynamoe.layers.expert_parallel import shard_experts

    layer = _layer(0, num_experts, top_k, capacity_factor, activation)
    x, g = _inputs(6 * world, starve)
    if starve:
        _starve_expert_0(layer)
    shard = slice(rank * 6, (rank + 1) * 6)  # each rank routes its own tokens
    shard_experts(layer, dist.group.WORLD, f"ep_size_{world}")
    y, dx, grads, counts = _forward_backward(layer, x[shard], g[shard])
    return {"y": y, "dx": dx, "grads": grads, "first": layer.experts.first_expert, "counts": counts}


@pytest.mark.parametrize(
    "world, num_experts, top_k, capacity_factor, starve, activation",
    [
        (2, 4, 2, None, False, "gelu"),
        (2, 4, 1, None, True, "swiglu"),  # rank 0's expert 0 receives nothing
        (2, 2, 1, None, True, "gelu"),  # all of rank 0's experts receive nothing
        (2, 4, 2, 1.0, False, "gelu"),  # capacity drops, decided per rank
        (4, 4, 2, None, False, "gelu"),
    ],
)
def test_expert_parallel_equals_one_device(world, num_experts, top_k, capacity_factor, starve, activation):
    results = run_workers(
        _ep_worker,
        world,
        num_experts=num_experts,
        top_k=top_k,
        capacity_factor=capacity_factor,
        starve=starve,
        activation=activation,
    )
    x, g = _inputs(6 * world, starve)

    def reference_layer():
        layer = _layer(0, num_experts, top_k, capacity_factor, activation)
        if starve:
            _starve_expert_0(layer)
        return layer

    if capacity_factor is None:
        y, dx, grads, counts = _forward_backward(reference_layer(), x, g)
    else:  # capacity is per rank's batch: the reference routes each rank's tokens separately
        pieces = [
            _forward_backward(reference_layer(), x[r * 6 : (r + 1) * 6], g[r * 6 : (r + 1) * 6]) for r in range(world)
        ]
        y = torch.cat([p[0] for p in pieces])
        dx = torch.cat([p[1] for p in pieces])
        grads = {n: sum(p[2][n] for p in pieces) for n in pieces[0][2]}
        counts = sum(p[3] for p in pieces)
    tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r["y"] for r in results]), y, **tol)
    torch.testing.assert_close(torch.cat([r["dx"] for r in results]), dx, **tol)
    if starve:
        assert counts[0] == 0
        assert all(r["counts"][0] == 0 for r in results)
    for name, ref in grads.items():
        if name.startswith("experts."):  # each rank holds a shard: the shards, in rank order, are the whole
            got = torch.cat([r["grads"][name] for r in results])
        else:  # replicated: each rank has the gradient of its own tokens; their sum is the whole
            got = sum(r["grads"][name] for r in results)
        torch.testing.assert_close(got, ref, **tol, msg=name)
    assert [r["first"] for r in results] == [r * num_experts // world for r in range(world)]


def _decoder(block: str):
    from dynamoe.config import ModelConfig, MoEConfig, RouterConfig
    from dynamoe.models import build_model

    torch.manual_seed(0)
    moe = MoEConfig(
        num_experts=4,
        d_expert=12,
        num_shared_experts=1 if block == "modern" else 0,
        activation="swiglu" if block == "modern" else "gelu",
        router=RouterConfig(top_k=2, aux_loss_coef=0.0),  # the loss is a mean over each rank's tokens
    )
    modern = dict(block="modern", n_kv_heads=2, qk_norm="per_head", first_dense_layers=1) if block == "modern" else {}
    cfg = ModelConfig(vocab_size=30, d_model=16, n_layers=3, n_heads=4, d_ff=24, max_seq_len=8, moe=moe, **modern)
    return build_model(cfg).double()


def _decoder_inputs(world: int):
    gen = torch.Generator().manual_seed(7)
    return torch.randint(0, 30, (2 * world, 8), generator=gen), torch.randn(2 * world, 8, 30, generator=gen)


def _decoder_forward_backward(model, ids, g):
    out = model(ids)
    (out.logits * g.to(out.logits.dtype)).sum().backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _ep_decoder_worker(rank, world, block):
    import torch.distributed as dist

    from dynamoe.layers.expert_parallel import shard_experts

    model = _decoder(block)
    ids, g = _decoder_inputs(world)
    shard_experts(model, dist.group.WORLD, f"ep_size_{world}")
    rows = slice(rank * 2, (rank + 1) * 2)
    logits, grads = _decoder_forward_backward(model, ids[rows], g[rows])
    return {"logits": logits, "grads": grads}


@pytest.mark.parametrize("block", ["gpt2", "modern"])
def test_expert_parallel_decoder_equals_one_device(block):
    """A whole decoder (either block) with its experts split over 2 processes: logits and every
    gradient as on one device."""
    results = run_workers(_ep_decoder_worker, 2, block=block)
    ids, g = _decoder_inputs(2)
    logits, grads = _decoder_forward_backward(_decoder(block), ids, g)
    tol = dict(rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(torch.cat([r["logits"] for r in results]), logits, **tol)
    for name, ref in grads.items():
        if ".experts." in name:  # each rank holds a shard: the shards, in rank order, are the whole
            got = torch.cat([r["grads"][name] for r in results])
        else:  # replicated: each rank has the gradient of its own samples; their sum is the whole
            got = sum(r["grads"][name] for r in results)
        torch.testing.assert_close(got, ref, **tol, msg=name)
