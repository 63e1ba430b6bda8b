"""The benchmarks run end to end at tiny sizes and write the JSON of RESULTS.md's tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from statistics import median

import pytest

ROOT = Path(__file__).resolve().parents[2]
# The small corpus as every benchmark's data, and a model that trains in a second.
TINY_MODEL = [
    "model.num_layers=2",
    "model.hidden_size=32",
    "model.ffn_hidden_size=64",
    "model.num_attention_heads=4",
    "model.num_query_groups=2",
    "model.seq_length=32",
    "train.micro_batch_size=2",
    "train.global_batch_size=4",
]


def small_data(small_corpus: dict[str, Path]) -> list[str]:
    """The small corpus, not data/prepared: a fresh clone has not prepared the full corpus."""
    return [
        f"data.tokenizer={small_corpus['tokenizer']}",
        f"data.train_data={small_corpus['train']}",
        f"data.valid_data={small_corpus['val']}",
    ]


def run_script(
    script: str, tmp_path: Path, *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> tuple[dict, str]:
    """The JSON the benchmark wrote, and its standard output."""
    out = tmp_path / "out.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--json", str(out), *args],
        check=True,
        cwd=ROOT,
        timeout=timeout,
        capture_output=True,
        text=True,
        env=env,
    )
    return json.loads(out.read_text()), done.stdout


def run(script: str, tmp_path: Path, *args: str) -> dict:
    return run_script(script, tmp_path, *args)[0]


def test_table_update_benchmark(tmp_path: Path) -> None:
    # --no-deepspeed: the benchmark must not need it; its absence is reported, not fatal.
    out = run(
        "bench_table_update.py",
        tmp_path,
        "--rows",
        "400",
        "--dim",
        "64",
        "--repeats",
        "2",
        "--warmup",
        "1",
        "--history",
        "3",
        "--fractions",
        "0.05",
        "0.25",
        "--no-deepspeed",
    )
    assert out["fused_adamw_ms"] > 0 and out["stream_gbs"] > 0
    assert out["deepspeed_cpu_adam_ms"] is None and out["deepspeed_status"].startswith("skipped")
    assert out["row_kernel"] in ("cpp", "torch")
    assert [(r["dist"], r["fraction"]) for r in out["results"]] == [
        ("zipf", 0.05),
        ("zipf", 0.25),
        ("uniform", 0.05),
        ("uniform", 0.25),
    ]
    for r in out["results"]:
        assert r["touched_rows"] == round(400 * r["fraction"])
        assert set(r["ms"]) == {
            "exact",
            "lazy",
            "lazy_torch_fused",
            "lazy_torch",
            "torch_sparse_adam",
        }
        assert all(v > 0 for v in r["ms"].values())
        # The derived figures are the timings' ratios, as the RESULTS.md tables read them.
        for kind, ms in r["ms"].items():
            assert r["speedup_vs_fused"][kind] == pytest.approx(out["fused_adamw_ms"] / ms)
        assert set(r["fraction_of_stream"]) == {"lazy", "exact"}
        for kind in ("lazy", "exact"):
            gbs = r["row_update_gbs"][kind]
            assert r["fraction_of_stream"][kind] == pytest.approx(gbs / out["stream_gbs"])
    # Bandwidth is the touched rows' bytes over the time: GB/s x ms per row is one constant.
    per_row = [
        r["row_update_gbs"][k] * r["ms"][k] / r["touched_rows"]
        for r in out["results"]
        for k in ("lazy", "exact")
    ]
    assert per_row == pytest.approx([per_row[0]] * len(per_row))


def test_stem_ffn_benchmark(tmp_path: Path) -> None:
    out = run(
        "bench_stem_ffn.py",
        tmp_path,
        "--shapes",
        "256,32,64,500",
        "--repeats",
        "2",
        "--warmup",
        "1",
    )
    (r,) = out["results"]
    assert (r["tokens"], r["hidden"], r["ffn_hidden"], r["vocab"]) == (256, 32, 64, 500)
    assert set(r["ms"]) == {"dense", "stem", "stem_dense_grad"} and all(
        v > 0 for v in r["ms"].values()
    )
    assert 0 < r["unique_ids"] <= 256
    ms = r["ms"]
    assert r["stem_vs_dense"] == pytest.approx(ms["stem"] / ms["dense"])
    assert r["stem_dense_grad_vs_dense"] == pytest.approx(ms["stem_dense_grad"] / ms["dense"])
    assert r["stem_vs_stem_dense_grad"] == pytest.approx(ms["stem"] / ms["stem_dense_grad"])
    assert r["flops_ratio"] == 2 / 3


def test_host_tables_benchmark(tmp_path: Path, small_corpus: dict[str, Path]) -> None:
    tiny = [*small_data(small_corpus), *TINY_MODEL, "stem.layers=[0,1]"]
    out = run(
        "bench_host_tables.py",
        tmp_path,
        "--models",
        "tiny",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--cache-rows",
        "256",
        "--override",
        *tiny,
    )
    (r,) = out["results"]
    assert r["model"] == "tiny" and r["total_params"] > r["active_params"] > 0
    v = r["variants"]
    assert set(v) == {
        "device",
        "host",
        "host_cache",
        "device_noclip",
        "host_noclip",
        "host_overlap",
    } and all(x["step_ms"] > 0 for x in v.values())
    assert (
        v["host_overlap"]["overlapped_tables"] == 2 and v["host_noclip"]["overlapped_tables"] == 0
    )
    assert v["device"]["bytes_h2d"] == 0 and v["host"]["cache_hit_rate"] == 0
    assert 0 < v["host_cache"]["bytes_h2d"] < v["host"]["bytes_h2d"]
    assert 0 < v["host_cache"]["cache_hit_rate"] <= 1
    for ratio, (num, den) in {
        "host_vs_device": ("host", "device"),
        "host_cache_vs_device": ("host_cache", "device"),
        "host_noclip_vs_device_noclip": ("host_noclip", "device_noclip"),
        "host_overlap_vs_device_noclip": ("host_overlap", "device_noclip"),
    }.items():
        assert r[ratio] == pytest.approx(v[num]["step_ms"] / v[den]["step_ms"])


def test_comm_benchmark(tmp_path: Path, small_corpus: dict[str, Path]) -> None:
    scratch = tmp_path / "tmp"  # the benchmark's temporary run dir must appear, then go
    scratch.mkdir()
    tiny = [
        *small_data(small_corpus),
        *TINY_MODEL,
        "model.make_vocab_size_divisible_by=64",
        "stem.layers=[1]",
    ]
    out, stdout = run_script(
        "bench_comm.py",
        tmp_path,
        "--steps",
        "1",
        "--override",
        *tiny,
        timeout=600,
        env={**os.environ, "TMPDIR": str(scratch)},
    )
    (run_dir,) = [line.split()[2] for line in stdout.splitlines() if line.startswith("run dir:")]
    assert Path(run_dir).parent == scratch and not Path(run_dir).exists()
    runs, s = out["runs"], out["summary"]
    assert runs["tp2_stem"]["comm/tp_bytes"] == runs["tp2_dense"]["comm/tp_bytes"] > 0
    assert s["tp2_stem_added_bytes"] == 0 and s["tp2_stem_over_dense"] == 1
    # Sequence parallelism: reduce-scatters and all-gathers instead of all-reduces; STEM
    # still adds nothing.
    assert runs["tp2_sp_stem"]["comm/tp_bytes"] == runs["tp2_sp_dense"]["comm/tp_bytes"] > 0
    assert s["tp2_sp_stem_added_bytes"] == 0
    assert runs["tp2_stem"]["comm/reduce_scatter_bytes"] == 0
    assert runs["tp2_sp_stem"]["comm/reduce_scatter_bytes"] > 0
    assert s["tp2_sp_over_no_sp_ring"] == pytest.approx(
        s["tp2_sp_stem_ring_bytes"] / s["tp2_stem_ring_bytes"]
    )
    for layout in ("dp2_replicated", "dp2_vocab_sharded"):
        # One table of the 512-token vocabulary (a multiple of 64) x d_ff 64, fp32.
        assert s[f"{layout}_dense_table_sync_bytes"] == 4 * 512 * 64
        assert 0 < s[f"{layout}_table_sync_bytes"] < s[f"{layout}_dense_table_sync_bytes"]
        assert s[f"{layout}_table_sync_bytes"] == runs[layout]["comm/dp_stem_bytes"]
        assert s[f"{layout}_over_dense_table_sync"] == pytest.approx(
            s[f"{layout}_table_sync_bytes"] / s[f"{layout}_dense_table_sync_bytes"]
        )
        assert 0 < runs[layout]["unique_rows"] < 512
    assert s["all_to_all_bytes"] == 0


def test_dense_optimizer_benchmark(tmp_path: Path) -> None:
    # --no-deepspeed: its first use JIT-builds an op for minutes; its absence is reported.
    out = run(
        "bench_dense_optimizer.py",
        tmp_path,
        "--sizes",
        "32:1",
        "--repeats",
        "2",
        "--warmup",
        "1",
        "--rounds",
        "2",
        "--threads",
        "1",
        "--no-deepspeed",
    )
    assert out["deepspeed_status"].startswith("skipped") and out["deepspeed_op_load_s"] is None
    (r,) = out["results"]
    # One decoder layer of width 32: qkv 64x32, proj 32x32, fc1 192x32, fc2 32x96, two norms.
    assert (r["tensors"], r["params"]) == (6, 2048 + 1024 + 6144 + 3072 + 64)
    kernels = r["kernels"]
    assert set(kernels) == {
        "torch_fused",
        "torch_fused_per_tensor",
        "torch_foreach",
        "torch_for_loop",
    }
    base = kernels["torch_fused"]
    assert out["threads"] == 1 and out["rounds"] == 2
    for row in kernels.values():
        for key in ("step_ms", "step_cpu_ms", "offload_step_ms", "offload_step_cpu_ms"):
            assert row[key] > 0
            assert row[f"{key}_vs_torch_fused"] == pytest.approx(row[key] / base[key])
    # Every kernel computes the same AdamW from the same start: fp32 rounding apart.
    assert "max_abs_diff_vs_torch_fused" not in base
    assert all(
        kernels[k]["max_abs_diff_vs_torch_fused"] < 1e-6 for k in kernels if k != "torch_fused"
    )


SAMPLED_STEPS = 10


def run_memory_features(
    tmp_path: Path, small_corpus: dict[str, Path], *variants: str
) -> tuple[dict, str]:
    tiny = [
        *small_data(small_corpus),
        *TINY_MODEL,
        "model.make_vocab_size_divisible_by=64",
        "stem.layers=[1]",
    ]
    # 10 steps: the sampler must see each rank between the warmup step and the last one; 3
    # tiny steps often all passed between two of its polls ('RSS of 0 of 1 ranks sampled').
    out, stdout = run_script(
        "bench_memory_features.py",
        tmp_path,
        "--models",
        "tiny",
        "--steps",
        str(SAMPLED_STEPS),
        "--variants",
        *variants,
        "--override",
        *tiny,
        timeout=1800,
    )
    return out["results"]["tiny"], stdout


def test_memory_features_benchmark(tmp_path: Path, small_corpus: dict[str, Path]) -> None:
    rows, stdout = run_memory_features(tmp_path, small_corpus, "dp2")
    assert list(rows) == ["baseline", "dp2"]  # the baseline always runs, first
    for name, processes in (("baseline", 1), ("dp2", 2)):
        r = rows[name]
        assert r["status"] == "ok" and r["processes"] == processes
        assert len(r["step_s"]) == SAMPLED_STEPS
        assert r["median_step_s"] == pytest.approx(median(r["step_s"][1:]))
        # CPU seconds of the steps after the first whose start and end lines a poll saw, all
        # ranks summed; an idle machine runs these tiny steps faster than the sampler polls, so
        # there may be none (the benchmark then prints "-").
        assert len(r["step_cpu_s"]) <= SAMPLED_STEPS - 1
        assert all(0 < s < 60 for s in r["step_cpu_s"])
        assert r["median_step_cpu_s"] == (
            pytest.approx(median(r["step_cpu_s"])) if r["step_cpu_s"] else None
        )
        # Each rank is a trainer (~400 MiB here), not the torchrun agent (~220 MiB).
        assert len(r["rank_peak_rss_mib"]) == processes and min(r["rank_peak_rss_mib"]) > 300
        assert r["peak_rss_mib"] == max(r["rank_peak_rss_mib"])
        assert r["startup_peak_rss_mib"] > 300  # before the reset after the warmup step
    r, base = rows["dp2"], rows["baseline"]  # dp2 is compared with the one-process baseline
    for key in ("vs_off", "vs_baseline"):
        assert r[f"step_time_{key}"] == pytest.approx(r["median_step_s"] / base["median_step_s"])
        assert r[f"peak_rss_{key}"] == pytest.approx(r["peak_rss_mib"] / base["peak_rss_mib"])
        if r["median_step_cpu_s"] and base["median_step_cpu_s"]:
            assert r[f"step_cpu_{key}"] == pytest.approx(
                r["median_step_cpu_s"] / base["median_step_cpu_s"]
            )
    assert "| tiny | dp2 | 2 |" in stdout


@pytest.mark.slow  # eleven short torchrun launches: several minutes on 2 shared cores
def test_memory_features_benchmark_covers_every_feature(
    tmp_path: Path, small_corpus: dict[str, Path]
) -> None:
    rows, _ = run_memory_features(tmp_path, small_corpus, "all")
    assert {name: r["status"] for name, r in rows.items()} == {name: "ok" for name in rows}
    assert len(rows) == 11
    for name, r in rows.items():
        if name != "baseline":  # each feature against the same layout without it
            assert r["step_time_vs_off"] > 0 and r["peak_rss_vs_off"] > 0
