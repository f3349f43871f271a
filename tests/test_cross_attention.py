"""Cross-attention in the U-Net (tutorial §6; LDM's spatial transformer): the mask, the identity at init, the shapes of
every preset, and attention checked against a hand-written softmax."""

import math

import pytest
import torch
from test_unet import reinit  # PyTorch's default (non-zero) init everywhere, so every path carries signal
from torch import nn

from difflab.errors import DifflabError
from difflab.nn import UNet, unet_config
from difflab.nn.layers import MultiHeadAttention, SpatialTransformer


def text_cond(n=2, length=6, width=16, real=(3, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(n, length, width, generator=g)
    mask = torch.zeros(n, length, dtype=torch.bool)
    for i, k in enumerate(real[:n]):
        mask[i, :k] = True
    return {"tokens": tokens, "mask": mask}


def text_unet(preset="tiny", size=8, width=16, depth=1):
    return UNet(unet_config(preset, image_size=size, in_channels=3, context_dim=width, transformer_depth=depth))


def test_attention_matches_a_handwritten_masked_softmax():
    torch.manual_seed(0)
    attn = MultiHeadAttention(8, num_heads=2, context_dim=5)
    x, ctx = torch.randn(2, 7, 8), torch.randn(2, 4, 5)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    out = attn(x, ctx, mask)
    q = attn.q(x).view(2, 7, 2, 4).transpose(1, 2)
    k, v = attn.kv(ctx).view(2, 4, 2, 2, 4).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-1, -2) / math.sqrt(4)  # (2, heads, 7, 4)
    logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
    expected = attn.out((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 7, 8))
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


def test_an_all_padding_context_gives_zero_not_nan():
    attn = MultiHeadAttention(8, num_heads=2, context_dim=5)
    out = attn(torch.randn(2, 3, 8), torch.randn(2, 4, 5), torch.tensor([[False] * 4, [True] * 4]))
    assert torch.isfinite(out).all() and out[0].abs().max() == 0 and out[1].abs().max() > 0


def test_spatial_transformer_is_the_identity_at_init():
    block = SpatialTransformer(16, num_heads=4, groups=8, context_dim=12, depth=2)
    x = torch.randn(2, 16, 4, 4)
    c = text_cond(width=12)
    torch.testing.assert_close(block(x, c["tokens"], c["mask"]), x, atol=0, rtol=0)


@pytest.mark.parametrize("depth", [1, 2])
def test_padding_content_changes_nothing_and_one_real_token_does(depth):
    net = reinit(text_unet(depth=depth)).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10.0, 600.0])
    cond = text_cond()
    with torch.no_grad():
        base = net(x, t, cond)
        padded = {"tokens": cond["tokens"].clone(), "mask": cond["mask"]}
        padded["tokens"][0, 3:] = 100 * torch.randn(3, 16)  # example 0 has 3 real tokens: change only the padding
        torch.testing.assert_close(net(x, t, padded), base, atol=1e-5, rtol=1e-5)
        one = {"tokens": cond["tokens"].clone(), "mask": cond["mask"]}
        one["tokens"][0, 1] = torch.randn(16, generator=torch.Generator().manual_seed(5))  # a real token of example 0
        changed = net(x, t, one)
    assert (changed[0] - base[0]).abs().max() > 1e-3
    torch.testing.assert_close(changed[1], base[1], atol=1e-5, rtol=1e-5)  # the other example is untouched


def test_cross_attention_starts_as_the_identity_so_an_untrained_unet_ignores_the_prompt():
    net = text_unet()
    for m in net.modules():  # signal everywhere except the zero-initialised last layers
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.abs().sum() > 0:
            m.reset_parameters()
    net.conv_out.weight.data.normal_()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5.0, 5.0])
    with torch.no_grad():
        a, b = net(x, t, text_cond(seed=1)), net(x, t, text_cond(seed=2))
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("preset, size", [("tiny", 8), ("tiny", 16), ("small", 32), ("ddpm-cifar10", 32)])
def test_every_preset_takes_a_text_condition(preset, size):
    net = UNet(unet_config(preset, image_size=size, in_channels=3, context_dim=24))
    transformers = [m for m in net.modules() if isinstance(m, SpatialTransformer)]
    assert transformers, "cross-attention replaces the attention blocks"
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        out = net(x, torch.tensor([3.0]), text_cond(n=1, width=24))
    assert out.shape == x.shape


def test_class_and_text_conditions_are_refused_where_they_do_not_fit():
    with torch.no_grad():
        with pytest.raises(DifflabError, match="text-conditional"):
            text_unet()(torch.randn(1, 3, 8, 8), torch.tensor([1.0]), None)
        with pytest.raises(DifflabError, match="without cross-attention"):
            UNet(unet_config("tiny", image_size=8, in_channels=3))(torch.randn(2, 3, 8, 8), torch.tensor([1.0]),
                                                                  text_cond())
        with pytest.raises(DifflabError, match="does not fit"):
            text_unet(width=16)(torch.randn(2, 3, 8, 8), torch.tensor([1.0]), text_cond(width=8))
    with pytest.raises(DifflabError, match="context_dim"):
        unet_config("tiny", image_size=8, in_channels=3, context_dim=0)


def test_a_unet_with_a_scratch_encoder_encodes_ids_itself_and_trains_it():
    from difflab.nn.text import ScratchTextEncoder

    enc = ScratchTextEncoder.from_texts(["a red circle", "a blue square"], width=16, layers=1, heads=2)
    net = reinit(UNet(unet_config("tiny", image_size=8, in_channels=3, context_dim=16, text_encoder=enc.config())))
    ids = net.text_encoder.tokenize(["a red circle", "a blue square"])
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3.0, 3.0])
    out = net(x, t, {"ids": ids["ids"], "mask": ids["mask"]})
    out.square().mean().backward()
    assert net.text_encoder.embed.weight.grad.abs().sum() > 0
    with torch.no_grad():  # the same as handing it the encoder's tokens
        tokens = net.text_encoder(ids["ids"], ids["mask"]).tokens
        torch.testing.assert_close(net(x, t, {"tokens": tokens, "mask": ids["mask"]}), out.detach())
