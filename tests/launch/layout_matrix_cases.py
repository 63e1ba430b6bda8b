"""The layout matrix of issue 10: every TP x PP x DP product the shipped configs use, shrunk to
a 4-layer model, crossed with the flags that change how a layout trains. `FULL` is the whole
cross product; `DEFAULT` a covering subset small enough for the default suite (its coverage is
checked by test_layout_matrix.py, not taken on trust); `shape_of` shrinks a shipped config's
layout and flags to the smallest world that keeps them."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import yaml

NUM_LAYERS = 4  # divisible by PP2 x VP2: interleaving keeps one layer per model chunk

# flag: the overrides that turn it on (off: the config defaults).
FLAGS = {
    "vocab_sharded": ["stem.dp_layout=vocab_sharded"],
    "distopt": ["optim.use_distributed_optimizer=true"],
    "recompute": [
        "model.recompute_granularity=full",
        "model.recompute_method=uniform",
        "model.recompute_num_layers=1",
    ],
    "sp": ["parallel.sequence_parallel=true"],
}


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    vp: int | None = None  # model chunks per pipeline rank (interleaved 1F1B)

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def overrides(self) -> list[str]:
        out = [
            f"parallel.tensor_model_parallel_size={self.tp}",
            f"parallel.pipeline_model_parallel_size={self.pp}",
        ]
        if self.vp:
            out.append(f"parallel.virtual_pipeline_model_parallel_size={self.vp}")
        return out

    @property
    def flags(self) -> tuple[str, ...]:
        """The flags that mean something here: a table layout needs DP, SP needs TP."""
        return tuple(
            f for f in FLAGS if (f != "vocab_sharded" or self.dp > 1) and (f != "sp" or self.tp > 1)
        )


LAYOUTS = {
    "pp2xdp2": Layout(pp=2, dp=2),
    "pp2xdp2-interleaved": Layout(pp=2, dp=2, vp=2),
    "tp2xdp2": Layout(tp=2, dp=2),
    "tp2xpp2": Layout(tp=2, pp=2),
    "tp2xpp2xdp2": Layout(tp=2, pp=2, dp=2),  # 8 processes: slow suite only
}
EIGHT_PROCESSES = {"tp2xpp2xdp2"}


@dataclass(frozen=True)
class Case:
    layout: str
    on: frozenset[str]  # the flags turned on

    @property
    def id(self) -> str:
        return "-".join([self.layout, *[f for f in FLAGS if f in self.on]] or [self.layout])

    @property
    def overrides(self) -> list[str]:
        return LAYOUTS[self.layout].overrides + [o for f in FLAGS if f in self.on for o in FLAGS[f]]


def case(layout: str, *on: str) -> Case:
    assert set(on) <= set(LAYOUTS[layout].flags), (layout, on)
    return Case(layout, frozenset(on))


FULL = [
    Case(name, frozenset(f for f, v in zip(layout.flags, values) if v))
    for name, layout in LAYOUTS.items()
    for values in itertools.product((False, True), repeat=len(layout.flags))
]

# Per layout a row and its complement (each flag off once and on once); tp2xdp2, the only
# 4-process layout with both a table layout and SP, adds the two rows that give that pair its
# other two combinations. Across the set every pair of flags takes all four combinations.
DEFAULT = [
    case("pp2xdp2"),  # issue 10 item 1: the reported command's layout
    case("pp2xdp2", "vocab_sharded", "distopt", "recompute"),
    case("pp2xdp2-interleaved", "distopt", "recompute"),
    case("pp2xdp2-interleaved", "vocab_sharded"),
    case("tp2xpp2", "recompute"),
    case("tp2xpp2", "distopt", "sp"),
    case("tp2xdp2", "distopt"),
    case("tp2xdp2", "vocab_sharded", "recompute", "sp"),
    case("tp2xdp2", "sp"),
    case("tp2xdp2", "vocab_sharded", "distopt", "recompute"),
]
SLOW = [c for c in FULL if c not in DEFAULT]

# The keys a shipped config's layout is made of, besides the TP/PP/VP sizes: copied as they are.
SHAPE_KEYS = {
    "parallel": ("sequence_parallel", "overlap_grad_reduce", "grad_reduce_in_fp32"),
    "optim": ("use_distributed_optimizer", "optimizer_cpu_offload", "optimizer_offload_fraction"),
    "train": ("bf16",),
    "model": ("recompute_granularity", "recompute_method", "untie_embeddings_and_output_weights"),
    "stem": ("dp_layout", "storage"),
}


def shape_of(config: Path) -> tuple[Layout, list[str], list[str]]:
    """The smallest layout with the config's shape: each of TP, PP and DP (DP > 1 on any
    cluster) at 2, interleaving kept, and the config's layout flags; plus the model overrides
    that keep its attention shape (full multi-head, or one KV group per TP rank)."""
    raw = yaml.safe_load(config.read_text())
    parallel = raw.get("parallel", {})
    sizes = [
        parallel.get(k, 1) for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size")
    ]
    vp = parallel.get("virtual_pipeline_model_parallel_size")
    layout = Layout(*[min(s, 2) for s in sizes], dp=2, vp=2 if vp and vp > 1 else None)
    flags = [
        f"{section}.{key}={_yaml_value(raw[section][key])}"
        for section, keys in SHAPE_KEYS.items()
        for key in keys
        if key in raw.get(section, {})
    ]
    model = raw["model"]
    per_chunk = NUM_LAYERS // (layout.pp * (layout.vp or 1))
    if model.get("recompute_num_layers"):  # a group or block cannot exceed a chunk's layers
        flags.append(f"model.recompute_num_layers={min(model['recompute_num_layers'], per_chunk)}")
    mha = model["num_query_groups"] == model["num_attention_heads"]
    return layout, flags, ["model.num_query_groups=4"] if mha else []


def _yaml_value(value) -> str:
    return (
        "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    )
