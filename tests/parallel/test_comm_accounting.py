"""Communication accounting on real gloo processes: STEM adds no tensor-parallel traffic, DDP
moves exactly the dense gradients, and the STEM table sync moves rows touched, not the vocab."""

from __future__ import annotations

import pytest

from stem_megatron.parallel.local_workers import run_local_workers
from stem_megatron.training.short_run import train_steps


@pytest.fixture(scope="module")
def base(small_corpus, tmp_path_factory):
    return [
        "model.num_layers=2", "model.hidden_size=32", "model.ffn_hidden_size=64",
        "model.num_attention_heads=4", "model.num_query_groups=2", "model.seq_length=32",
        "model.make_vocab_size_divisible_by=64", "stem.layers=[1]",
        "train.micro_batch_size=2", "train.global_batch_size=4", "train.train_iters=10",
        f"data.tokenizer={small_corpus['tokenizer']}",
        f"data.train_data={small_corpus['train']}", f"data.valid_data={small_corpus['val']}",
        f"logging.run_dir={tmp_path_factory.mktemp('comm')}",
    ]


def test_stem_adds_no_tensor_parallel_traffic(base):
    tp = ["parallel.tensor_model_parallel_size=2"]
    stem = run_local_workers(2, train_steps, base + tp, 2)[0]["comm"]
    dense = run_local_workers(2, train_steps, base + tp + ["stem.enabled=false"], 2)[0]["comm"]
    assert stem["comm/tp_bytes"] > 0
    assert stem["comm/tp_bytes"] == dense["comm/tp_bytes"]
    assert stem["comm/dp_stem_bytes"] == 0 and stem["comm/dp_dense_bytes"] == 0


@pytest.mark.parametrize("layout", ["replicated", "vocab_sharded"])
def test_data_parallel_bytes(base, layout):
    result = run_local_workers(2, train_steps, base + [f"stem.dp_layout={layout}"], 2)[0]
    comm, counts = result["comm"], result["counts"]
    # DDP all-reduces each dense gradient once per step, fp32.
    assert comm["comm/dp_dense_bytes"] == 4 * counts["dense_params"]
    assert comm["comm/tp_bytes"] == 0 and comm["comm/pp_bytes"] == 0
    assert comm["comm/dp_stem_bytes"] > 0
    if layout == "replicated":
        # One table: the all-reduce of [union rows, 64] fp32, plus the id exchange (a count
        # and at most `union` int64 ids).
        union = result["unique_rows"]
        rows_bytes = 4 * union * 64
        assert rows_bytes <= comm["comm/dp_stem_bytes"] <= rows_bytes + 8 * (union + 1)
        assert union < counts["table_params"] // 64  # fewer rows than the vocab


def test_pipeline_sends_activations_and_gradients(base):
    result = run_local_workers(2, train_steps, base + ["parallel.pipeline_model_parallel_size=2",
                                                 "model.untie_embeddings_and_output_weights=true"],
                         1)
    # 2 micro-batches of [seq 32, batch 2, hidden 32] fp32: stage 0 sends activations forward,
    # stage 1 sends their gradients back.
    per_microbatch = 32 * 2 * 32 * 4
    assert [r["comm"]["comm/pp_bytes"] for r in result] == [2 * per_microbatch] * 2
