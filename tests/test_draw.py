"""rlhf.training.sequences.draw: one index per row with probability proportional to the row's entries (the
sampler of PPO rollouts and of the inference service), checked by frequency over many draws."""

from __future__ import annotations

import pytest
import torch

from rlhf.training.sequences import draw


def test_each_row_is_drawn_from_its_own_distribution_and_zero_entries_never():
    probs = torch.tensor(
        [
            [0.5, 0.0, 0.3, 0.2, 0.0],
            [0.0, 0.0, 0.0, 0.0, 1.0],
            [0.1, 0.1, 0.1, 0.1, 0.6],
            [2.0, 0.0, 0.0, 0.0, 2.0],  # unnormalised: proportional
        ]
    )
    generator = torch.Generator().manual_seed(0)
    n = 20_000
    counts = torch.zeros_like(probs)
    for _ in range(n):
        index = draw(probs, generator)
        assert index.shape == (4, 1)
        counts.scatter_add_(1, index, torch.ones(4, 1))
    expected = probs / probs.sum(-1, keepdim=True)
    # Binomial standard deviation at n = 20,000 is at most 0.0036: 0.015 is over 4 of them.
    assert (counts / n - expected).abs().max() < 0.015
    assert counts[probs == 0].sum() == 0


def test_the_same_generator_state_gives_the_same_draws():
    probs = torch.softmax(torch.randn(8, 631, generator=torch.Generator().manual_seed(1)), -1)
    first = [draw(probs, torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(first[0], first[1])
    generator = torch.Generator().manual_seed(5)
    assert not torch.equal(draw(probs, generator), draw(probs, generator))  # the state moves on


def test_a_rare_token_keeps_its_share_next_to_a_vocabulary_of_tiny_ones():
    # 50,257 entries, one of them 1e-3 near the end of the cumulative sum, where it is close to 1.
    probs = torch.full((1, 50_257), (1 - 1e-3) / 50_256, dtype=torch.float64)
    probs[0, 50_000] = 1e-3
    generator = torch.Generator().manual_seed(2)
    hits = sum(int(draw(probs, generator)) == 50_000 for _ in range(20_000))
    assert 8 <= hits <= 35  # expected 20, sd 4.5


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_rows_that_are_not_a_distribution_are_refused(bad):
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="cannot sample"):
        draw(torch.tensor([[0.2, 0.8], [bad, 0.5]]), generator)
    with pytest.raises(ValueError, match="cannot sample"):
        draw(torch.tensor([[0.0, 0.0]]), generator)
