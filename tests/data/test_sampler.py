import itertools

import numpy as np
import pytest
import torch

from stem_megatron.data.sampler import PackedSampleStream, ValidationBatches

SEQ = 8


@pytest.fixture()
def tokens() -> np.ndarray:
    # Token i has value i % 60000: every window's content tells where it starts.
    return (np.arange(1001) % 60000).astype(np.uint16)  # (1001 - 1) // 8 = 125 samples


def _take(stream, n) -> list[torch.Tensor]:
    return list(itertools.islice(stream, n))


def test_batches_are_shifted_windows_of_the_stream(tokens):
    stream = PackedSampleStream(tokens, SEQ, 4, seed=0)
    assert stream.samples_per_epoch == 125
    batch = next(stream)
    assert batch.shape == (4, SEQ + 1) and batch.dtype == torch.int64
    starts = batch[:, 0]
    assert torch.all(starts % SEQ == 0)
    assert torch.equal(batch, starts[:, None] + torch.arange(SEQ + 1))
    inputs, labels = batch[:, :-1], batch[:, 1:]
    assert torch.equal(labels, inputs + 1)


def test_epoch_visits_every_sample_once_in_a_seeded_order(tokens):
    stream = PackedSampleStream(tokens, SEQ, 5, seed=3)
    first_epoch = torch.cat(_take(stream, 25))[:, 0] // SEQ  # 25 * 5 = 125 samples
    assert sorted(first_epoch.tolist()) == list(range(125))
    assert first_epoch.tolist() != list(range(125))
    assert (stream.epoch, stream.position) == (1, 0)
    second_epoch = torch.cat(_take(stream, 25))[:, 0] // SEQ
    assert sorted(second_epoch.tolist()) == list(range(125))
    assert not torch.equal(first_epoch, second_epoch)  # reshuffled per epoch
    expected = np.random.default_rng([3, 1]).permutation(125)
    assert second_epoch.tolist() == expected.tolist()


def test_same_seed_same_stream_other_seed_other_stream(tokens):
    a = _take(PackedSampleStream(tokens, SEQ, 4, seed=11), 40)
    b = _take(PackedSampleStream(tokens, SEQ, 4, seed=11), 40)
    c = _take(PackedSampleStream(tokens, SEQ, 4, seed=12), 40)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_dp_ranks_are_disjoint_and_union_is_the_single_rank_stream(tokens):
    mbs, steps = 3, 50  # 50 * 3 * 2 = 300 samples: crosses two epoch boundaries mid-group
    single = _take(PackedSampleStream(tokens, SEQ, mbs, seed=5), 2 * steps)
    ranks = [
        _take(PackedSampleStream(tokens, SEQ, mbs, seed=5, dp_rank=r, dp_size=2), steps)
        for r in range(2)
    ]
    for step in range(steps):
        r0, r1 = ranks[0][step], ranks[1][step]
        assert torch.equal(torch.cat([r0, r1]), torch.cat(single[2 * step : 2 * step + 2]))
        if step < 20:  # inside the first epoch the two ranks never share a sample
            assert not set(r0[:, 0].tolist()) & set(r1[:, 0].tolist())


@pytest.mark.parametrize("stop", [1, 41, 42, 100])  # 41 * 3 = 123: the resume crosses the epoch end
def test_resume_yields_what_the_uninterrupted_stream_would(tokens, stop):
    full = _take(PackedSampleStream(tokens, SEQ, 3, seed=9), 120)
    first = PackedSampleStream(tokens, SEQ, 3, seed=9)
    _take(first, stop)
    state = first.state_dict()
    assert all(type(v) is int for v in state.values())
    resumed = PackedSampleStream(tokens, SEQ, 3, seed=9)
    resumed.load_state_dict(dict(state))
    rest = _take(resumed, 120 - stop)
    assert all(torch.equal(x, y) for x, y in zip(full[stop:], rest))


def test_resume_with_another_dp_size_continues_the_global_order(tokens):
    single = PackedSampleStream(tokens, SEQ, 2, seed=4)
    _take(single, 10)
    state = single.state_dict()
    expected = _take(single, 4)
    ranks = [PackedSampleStream(tokens, SEQ, 2, seed=4, dp_rank=r, dp_size=2) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    got = [b for pair in zip(*(_take(r, 2) for r in ranks)) for b in pair]
    assert all(torch.equal(x, y) for x, y in zip(expected, got))


def test_load_state_dict_refuses_other_data_or_seed(tokens):
    state = PackedSampleStream(tokens, SEQ, 2, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed=1, this run has 2"):
        PackedSampleStream(tokens, SEQ, 2, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="samples_per_epoch=125, this run has 62"):
        PackedSampleStream(tokens[:500], SEQ, 2, seed=1).load_state_dict(state)


def test_too_little_data_and_bad_arguments(tokens):
    with pytest.raises(
        ValueError, match="125 samples .* fewer than one step's micro_batch_size \\* dp_size = 128"
    ):
        PackedSampleStream(tokens, SEQ, 64, seed=0, dp_size=2)
    with pytest.raises(ValueError, match="dp_rank=2, dp_size=2"):
        PackedSampleStream(tokens, SEQ, 1, seed=0, dp_rank=2, dp_size=2)


def test_validation_batches_are_fixed_and_split_across_ranks(tokens):
    val = ValidationBatches(tokens, SEQ, 4, 5)
    first, second = list(val), list(val)
    assert len(val) == len(first) == 5
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    starts = torch.cat(first)[:, 0] // SEQ
    assert starts.tolist() == sorted(set(starts.tolist()))  # distinct samples...
    assert starts[0] == 0 and starts[-1] >= 115  # ...spread over the whole set
    ranks = [list(ValidationBatches(tokens, SEQ, 2, 5, dp_rank=r, dp_size=2)) for r in range(2)]
    for b in range(5):
        assert torch.equal(torch.cat([ranks[0][b], ranks[1][b]]), first[b])
    with pytest.raises(
        ValueError, match="= 128 samples of seq_length 8, but the validation set has 125"
    ):
        ValidationBatches(tokens, SEQ, 4, 32)
