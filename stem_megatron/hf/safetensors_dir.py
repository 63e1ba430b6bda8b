"""Read the safetensors weights of a Hugging Face model directory (one file, or shards named
by `model.safetensors.index.json`), one tensor at a time, without unpickling anything."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from stem_megatron.hf.llama_config import HFFormatError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsDir:
    """`names` of every stored tensor; `read(name)` loads one as fp32 on the CPU."""

    def __init__(self, hf_dir: Path):
        self.dir = hf_dir
        index = hf_dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise HFFormatError(
                    f"{index} is not a safetensors index (needs a 'weight_map' object): {exc}"
                ) from exc
            self.file_of = {name: hf_dir / file for name, file in weight_map.items()}
            absent = sorted({p.name for p in self.file_of.values() if not p.is_file()})
            if absent:
                raise HFFormatError(
                    f"{index} names shard(s) missing from {hf_dir}: {', '.join(absent)}"
                )
        elif (hf_dir / SINGLE_FILE).is_file():
            with safe_open(hf_dir / SINGLE_FILE, framework="pt") as f:
                self.file_of = {name: hf_dir / SINGLE_FILE for name in f.keys()}
        else:
            pickled = sorted(p.name for p in hf_dir.glob("*.bin"))
            hint = (
                f" (found {', '.join(pickled)}: pickled weights are not read; re-save "
                f"with save_pretrained(dir, safe_serialization=True))"
                if pickled
                else ""
            )
            raise HFFormatError(f"{hf_dir} holds neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")
        self._open: dict[Path, object] = {}

    @property
    def names(self) -> set[str]:
        return set(self.file_of)

    def read(self, name: str) -> torch.Tensor:
        if name not in self.file_of:
            raise HFFormatError(f"{self.dir}: tensor {name!r} is missing from the weights")
        path = self.file_of[name]
        if path not in self._open:
            self._open[path] = safe_open(path, framework="pt")
        return self._open[path].get_tensor(name).float()
