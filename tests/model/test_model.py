"""The megatron-core model against the plain reference, the STEM FFN against its formula,
and the table gradient against dense autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stem_megatron.config import ModelConfig
from stem_megatron.model.reference import ReferenceGPT
from stem_megatron.model.transformer import ModelSpec, StemGPTModel
from stem_megatron.parallel.state import ParallelState

VOCAB = 100


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    parallel = ParallelState.initialize()
    yield parallel
    parallel.destroy()


def build(stem_layers=(1, 3), untied=False, seed=7) -> StemGPTModel:
    m = ModelConfig(
        num_layers=4,
        hidden_size=64,
        ffn_hidden_size=96,
        num_attention_heads=4,
        num_query_groups=2,
        seq_length=32,
        make_vocab_size_divisible_by=64,
        untie_embeddings_and_output_weights=untied,
    )
    model = StemGPTModel(ModelSpec(model=m, vocab_size=VOCAB, stem_layers=tuple(stem_layers)))
    model.init_parameters(seed)
    return model


def reference(model: StemGPTModel, requires_grad: bool = False) -> ReferenceGPT:
    state = {
        k: v.detach().clone().requires_grad_(requires_grad)
        for k, v in model.state_dict().items()
        if isinstance(v, torch.Tensor)
    }
    return ReferenceGPT(model.spec.model, model.spec.stem_layers, state)


@pytest.mark.parametrize(
    "stem_layers,untied", [((1, 3), False), ((1, 3), True), ((), False), ((0, 1, 2, 3), True)]
)
def test_model_matches_reference(stem_layers, untied):
    model = build(stem_layers, untied)
    ids = torch.randint(0, VOCAB, (3, 32), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(ids, -1, dims=1)
    with torch.no_grad():
        logits, losses = model(ids), model(ids, labels)
        ref = reference(model)
        ref_logits, ref_losses = ref.logits(ids), ref.loss(ids, labels)
    assert logits.shape == (3, 32, 128)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(losses, ref_losses, rtol=0, atol=1e-6)


def test_dense_model_has_no_tables_and_stem_model_has_them():
    assert build(()).stem_tables() == {}
    tables = build((1, 3)).stem_tables()
    assert sorted(tables) == ["decoder.layers.1.mlp.stem_table", "decoder.layers.3.mlp.stem_table"]
    assert all(t.weight.shape == (VOCAB, 96) for t in tables.values())


def test_stem_ffn_equals_formula():
    model = build((1,))
    mlp = model.decoder.layers["1"].mlp
    x = torch.randn(5, 2, 64)
    ids = torch.randint(0, VOCAB, (5, 2))
    with torch.no_grad():
        out = mlp(x, ids)
        gate = x @ mlp.linear_fc1.weight.T
        expected = (F.silu(gate) * mlp.stem_table.weight[ids]) @ mlp.linear_fc2.weight.T
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    assert not hasattr(mlp, "linear_fc1_up")
    assert mlp.linear_fc1.weight.shape == (96, 64)  # gate only: the up-projection is the table


def test_table_init_is_xavier_normal():
    table = build((1,)).decoder.layers["1"].mlp.stem_table.weight
    expected_std = (2.0 / (VOCAB + 96)) ** 0.5
    assert abs(table.std().item() - expected_std) / expected_std < 0.05
    assert abs(table.mean().item()) < 3 * expected_std / (table.numel() ** 0.5)


def test_table_gradient_is_row_sparse_and_equals_dense_autograd():
    model = build((1, 3))
    ids = torch.tensor([[5, 7, 5, 9, 11, 5, 7, 60]])
    labels = torch.roll(ids, -1, dims=1)
    model(ids, labels).mean().backward()
    ref = reference(model, requires_grad=True)
    ref.loss(ids, labels).mean().backward()
    for name, table in model.stem_tables().items():
        assert table.weight.grad is None  # no dense [V, d_ff] gradient ever exists
        rows, grad = table.grad_accumulator.reduce()
        assert rows.tolist() == [5, 7, 9, 11, 60]
        dense = ref.w[name + ".weight"].grad
        torch.testing.assert_close(grad, dense[rows], rtol=1e-5, atol=1e-7)
        untouched = torch.ones(VOCAB, dtype=torch.bool)
        untouched[rows] = False
        assert torch.count_nonzero(dense[untouched]) == 0


def test_bf16_autocast_is_close_to_fp32():
    """Per logit and per token, not the mean loss: bf16 rounding moves logits by about 0.004
    and token losses by 0.001 here, while skipping every layer under autocast moves them by
    0.4 and 0.12 yet the mean loss by only 0.008 (measured)."""
    model = build((1, 3))
    ids = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(ids, -1, dims=1)
    with torch.no_grad():
        fp32_logits, fp32 = model(ids), model(ids, labels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16_logits, bf16 = model(ids), model(ids, labels)
    assert bf16.dtype == torch.float32  # the loss is computed in fp32 from bf16 logits
    torch.testing.assert_close(bf16_logits.float(), fp32_logits, rtol=0, atol=0.02)
    torch.testing.assert_close(bf16, fp32, rtol=0, atol=0.01)


def test_sequence_longer_than_config_is_refused():
    with pytest.raises(ValueError, match="longer than model.seq_length"):
        build()(torch.zeros(1, 33, dtype=torch.long))


def test_tp_size_must_divide_groups():
    m = ModelConfig(
        num_layers=1,
        hidden_size=64,
        ffn_hidden_size=96,
        num_attention_heads=4,
        num_query_groups=1,
        seq_length=8,
    )
    with pytest.raises(
        ValueError, match=r"tensor_model_parallel_size \(2\).*num_query_groups \(1\)"
    ):
        StemGPTModel(ModelSpec(model=m, vocab_size=VOCAB, stem_layers=(), tp_size=2))
