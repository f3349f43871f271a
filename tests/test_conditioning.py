"""The conditioning contract: cond is a batch-first tensor or a mapping of them; one set of helpers moves it; the
conditioner owns the null condition and the dropout; guidance and sampling never look inside cond."""

from __future__ import annotations

import pytest
import torch

from difflab.conditioning import (
    ClassConditioner,
    cond_cat,
    cond_expand,
    cond_index,
    cond_len,
    cond_repeat_interleave,
    cond_slice,
    cond_to,
    conditioner_from_config,
    parse_classes,
)
from difflab.errors import DifflabError
from difflab.guidance import classifier_free_guidance
from difflab.samplers import sample_ddim
from difflab.schedules import karras_sigmas

TEXT = {"tokens": torch.arange(24.0).reshape(3, 4, 2), "mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]])}


def test_helpers_treat_tensors_and_mappings_alike():
    labels = torch.tensor([4, 5, 6])
    for cond in (labels, TEXT):
        assert cond_len(cond) == 3
        parts = [cond_slice(cond, 0, 1), cond_slice(cond, 1, 3)]
        whole = cond_cat(parts)
        pick = cond_index(cond, torch.tensor([2, 0]))
        twice = cond_repeat_interleave(cond, 2)
        one = cond_slice(cond, 1, 2)
        many = cond_expand(one, 5)
        for get in ((lambda c: c) if torch.is_tensor(cond) else (lambda c: c["tokens"]),
                    (lambda c: c) if torch.is_tensor(cond) else (lambda c: c["mask"])):
            assert torch.equal(get(whole), get(cond))
            assert torch.equal(get(pick), get(cond)[[2, 0]])
            assert torch.equal(get(twice), get(cond).repeat_interleave(2, dim=0))
            assert torch.equal(get(many), get(one).expand(5, *get(one).shape[1:]))
        assert cond_len(cond_to(cond, "cpu")) == 3
    assert all(f(None) is None for f in (cond_len, lambda c: cond_slice(c, 0, 1), lambda c: cond_to(c, "cpu")))
    with pytest.raises(DifflabError, match="disagree on the batch size"):
        cond_len({"a": torch.zeros(2), "b": torch.zeros(3)})


def test_class_conditioner_owns_null_dropout_and_parsing():
    c = ClassConditioner(["cat", "dog", "3"], dropout=0.25)
    assert c.num_classes == 3 and torch.equal(c.null(2), torch.tensor([3, 3])) and c.trained_null
    labels = torch.zeros(40_000, dtype=torch.long)
    dropped = c.drop(labels, torch.Generator().manual_seed(0))
    assert set(dropped.unique().tolist()) == {0, 3} and (dropped == 3).float().mean().item() == pytest.approx(0.25, abs=0.01)
    # the draw happens even at dropout 0, so the random stream does not depend on the rate
    g0, g1 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(ClassConditioner(["a"], 0.0).drop(torch.zeros(5, dtype=torch.long), g0), torch.zeros(5, dtype=torch.long))
    torch.rand(5, generator=g1)
    assert torch.equal(torch.rand(3, generator=g0), torch.rand(3, generator=g1))
    assert c.parse("DOG,3,all").tolist() == [1, 2, 0, 1, 2]  # a name wins over an index ("3" is class 2)
    assert parse_classes("1", ["a", "b"]) == [1]
    with pytest.raises(DifflabError, match="unknown class 'bird'"):
        c.parse("bird")
    grid, per_row = c.grid(7)
    assert per_row == 2 and grid.tolist() == [0, 0, 1, 1, 2, 2]
    assert c.balanced(5).tolist() == [0, 1, 2, 0, 1]
    again = conditioner_from_config(c.config())
    assert again.class_names == c.class_names and again.dropout == 0.25
    assert conditioner_from_config(None) is None
    with pytest.raises(DifflabError, match="label-dropout"):
        ClassConditioner(["a"], 1.0)


def test_classifier_free_guidance_takes_a_mapping_cond_and_its_null():
    """A text-like cond (tokens + mask) goes through guidance and a sampler without either looking inside it:
    the denoiser below pulls x towards the masked mean of its tokens, and the null condition is all-zero tokens."""
    calls = []

    def denoiser(x, sigma, cond):
        calls.append(cond_len(cond))
        mask = cond["mask"].float()
        target = (cond["tokens"].sum(-1) * mask).sum(1) / mask.sum(1).clamp(min=1)  # (N,)
        return target.view(-1, 1, 1, 1) + 0 * x

    null = {"tokens": torch.zeros(1, 4, 2), "mask": torch.ones(1, 4, dtype=torch.long)}
    guided = classifier_free_guidance(denoiser, 2.5, null_cond=null)
    x, sigma = torch.randn(3, 1, 2, 2), torch.full((3,), 1.0)
    out = guided(x, sigma, TEXT)
    assert calls == [6]  # one network call on the conditional and unconditional halves together
    conditional = denoiser(x, sigma, TEXT)
    torch.testing.assert_close(out, 2.5 * conditional)  # the null estimate is 0 here: D_w = 0 + 2.5 (D_c - 0)
    sample = sample_ddim(guided, x * 80, karras_sigmas(3, 0.01, 80.0), cond=TEXT)
    torch.testing.assert_close(sample, out)  # the last step returns the (constant) guided estimate
