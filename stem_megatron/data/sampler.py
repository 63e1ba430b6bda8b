"""Fixed-length samples from a packed token stream: shuffled, data-parallel, resumable.

The stream is the whole `.bin` as one array (documents joined by eod, as preprocessing
writes them). Sample i is tokens[i*S : i*S + S + 1] for S = seq_length, so consecutive
samples share one token and every token is a label exactly once per epoch (Megatron's
GPTDataset does the same). A training micro-batch is [micro_batch_size, S + 1] int64:
inputs = batch[:, :-1], labels = batch[:, 1:].

Order: epoch e visits all samples in the permutation drawn by numpy's Generator seeded
with (seed, e); epochs follow each other without a seam. The global order is cut into
groups of micro_batch_size * dp_size samples and DP rank r takes the r-th slice of each
group, so the ranks' micro-batches are disjoint and together equal the dp_size=1 stream.
"""

from __future__ import annotations

import numpy as np
import torch


def _num_samples(tokens: np.ndarray, seq_length: int) -> int:
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    return max(0, (int(tokens.shape[0]) - 1) // seq_length)


def _check_dp(dp_rank: int, dp_size: int) -> None:
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")


def _gather(tokens: np.ndarray, sample_ids: np.ndarray, seq_length: int) -> torch.Tensor:
    """Rows of seq_length + 1 tokens starting at sample_id * seq_length, one fancy index."""
    starts = sample_ids.astype(np.int64) * seq_length
    rows = tokens[starts[:, None] + np.arange(seq_length + 1, dtype=np.int64)]
    return torch.from_numpy(np.asarray(rows, dtype=np.int64))


class PackedSampleStream:
    """Endless, seeded stream of training micro-batches for one data-parallel rank.

    Cost per micro-batch is one fancy index of micro_batch_size * (seq_length + 1) tokens;
    per epoch one permutation of (num_tokens - 1) // seq_length sample ids.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_length: int,
        micro_batch_size: int,
        *,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
    ):
        _check_dp(dp_rank, dp_size)
        if micro_batch_size < 1 or seed < 0:
            raise ValueError(
                f"need micro_batch_size >= 1 and seed >= 0, got {micro_batch_size}, {seed}"
            )
        self.tokens = tokens
        self.seq_length = seq_length
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.samples_per_epoch = _num_samples(tokens, seq_length)
        group = micro_batch_size * dp_size
        if self.samples_per_epoch < group:
            raise ValueError(
                f"{tokens.shape[0]} tokens give {self.samples_per_epoch} samples of seq_length "
                f"{seq_length}, fewer than one step's micro_batch_size * dp_size = {group}: "
                "use more data or smaller batches"
            )
        # Position of the next group in the global order; identical on every DP rank.
        self.epoch = 0
        self.position = 0
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(
                self.samples_per_epoch
            )
            self._perm_epoch = epoch
        return self._perm

    def _take(self, count: int) -> np.ndarray:
        """The next `count` sample ids of the global order, crossing epochs as needed."""
        parts = []
        while count:
            n = min(count, self.samples_per_epoch - self.position)
            parts.append(self._permutation(self.epoch)[self.position : self.position + n])
            self.position += n
            count -= n
            if self.position == self.samples_per_epoch:
                self.epoch, self.position = self.epoch + 1, 0
        return np.concatenate(parts)

    def __iter__(self) -> PackedSampleStream:
        return self

    def __next__(self) -> torch.Tensor:
        group = self._take(self.micro_batch_size * self.dp_size)
        mine = group[
            self.dp_rank * self.micro_batch_size : (self.dp_rank + 1) * self.micro_batch_size
        ]
        return _gather(self.tokens, mine, self.seq_length)

    def state_dict(self) -> dict[str, int]:
        # Plain ints only, the same on every rank: fits any checkpoint format, and a
        # resume with another dp_size continues the same global order.
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "seq_length": self.seq_length,
            "samples_per_epoch": self.samples_per_epoch,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        mine = self.state_dict()
        for key in ("seed", "seq_length", "samples_per_epoch"):
            if int(state[key]) != mine[key]:
                raise ValueError(
                    f"cannot resume the data stream: checkpoint has {key}={state[key]}, "
                    f"this run has {mine[key]} (different data, seed or seq_length would "
                    "silently change the sample order)"
                )
        if not 0 <= int(state["position"]) < self.samples_per_epoch or int(state["epoch"]) < 0:
            raise ValueError(f"invalid data stream state {state}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class ValidationBatches:
    """A fixed set of `num_batches` validation micro-batches for one DP rank, the same on
    every pass. Samples are spread evenly over the whole validation set (not its first
    document only); batch b of all ranks together is group b, disjoint across ranks.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_length: int,
        micro_batch_size: int,
        num_batches: int,
        *,
        dp_rank: int = 0,
        dp_size: int = 1,
    ):
        _check_dp(dp_rank, dp_size)
        available = _num_samples(tokens, seq_length)
        need = num_batches * micro_batch_size * dp_size
        if num_batches < 1 or micro_batch_size < 1 or need > available:
            raise ValueError(
                f"validation needs {num_batches} batches x micro_batch_size {micro_batch_size} "
                f"x dp_size {dp_size} = {need} samples of seq_length {seq_length}, but the "
                f"validation set has {available}: lower the number of eval batches or hold out "
                "more data"
            )
        self.tokens = tokens
        self.seq_length = seq_length
        ids = np.arange(need, dtype=np.int64) * available // need  # evenly spaced, distinct
        groups = ids.reshape(num_batches, dp_size, micro_batch_size)
        self._ids = groups[:, dp_rank]

    def __len__(self) -> int:
        return self._ids.shape[0]

    def __iter__(self):
        for ids in self._ids:
            yield _gather(self.tokens, ids, self.seq_length)
