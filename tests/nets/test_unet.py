"""UNet2D: SSL4MIS's 2D U-Net (its parameter names, shapes, count and forward), plus ghost batch norm and MC dropout.

The expected names and shapes are written here from reading SSL4MIS ``code/networks/unet.py`` (HiLab-git/SSL4MIS
@06df604: ``UNet(in_chns=1, class_num=4)``; its ``Decoder`` builds every ``UpBlock`` with the default
``bilinear=True``: a 1x1 conv, then bilinear upsampling), not from the module under test.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import uamt_fast
from uamt_fast import UNet2D, mc_dropout

# (prefix, in, out) of each ConvBlock (two 3x3 convs with batch norm), in SSL4MIS's construction order.
CONV_BLOCKS = [
    ("encoder.in_conv", 1, 16),
    ("encoder.down1.maxpool_conv.1", 16, 32),
    ("encoder.down2.maxpool_conv.1", 32, 64),
    ("encoder.down3.maxpool_conv.1", 64, 128),
    ("encoder.down4.maxpool_conv.1", 128, 256),
    ("decoder.up1.conv", 256, 128),
    ("decoder.up2.conv", 128, 64),
    ("decoder.up3.conv", 64, 32),
    ("decoder.up4.conv", 32, 16),
]
# (prefix, in, out) of each UpBlock's 1x1 conv, built just before that UpBlock's ConvBlock.
CONV1X1 = {"decoder.up1.conv": ("decoder.up1.conv1x1", 256, 128), "decoder.up2.conv": ("decoder.up2.conv1x1", 128, 64),
           "decoder.up3.conv": ("decoder.up3.conv1x1", 64, 32), "decoder.up4.conv": ("decoder.up4.conv1x1", 32, 16)}
# SSL4MIS UNet's params["dropout"] (encoder); its decoder's ConvBlocks get dropout_p=0.0.
DROPOUT = {"encoder.in_conv.conv_conv.3": 0.05, "encoder.down1.maxpool_conv.1.conv_conv.3": 0.1,
           "encoder.down2.maxpool_conv.1.conv_conv.3": 0.2, "encoder.down3.maxpool_conv.1.conv_conv.3": 0.3,
           "encoder.down4.maxpool_conv.1.conv_conv.3": 0.5}


def ssl4mis_state_shapes(num_classes: int = 4) -> dict[str, tuple]:
    """SSL4MIS UNet's state-dict keys, in order, with their shapes."""
    shapes = {}
    for prefix, c_in, c_out in CONV_BLOCKS:
        if prefix in CONV1X1:
            name, a, b = CONV1X1[prefix]
            shapes |= {f"{name}.weight": (b, a, 1, 1), f"{name}.bias": (b,)}
        for conv_index, bn_index, fan_in in ((0, 1, c_in), (4, 5, c_out)):
            conv, bn = f"{prefix}.conv_conv.{conv_index}", f"{prefix}.conv_conv.{bn_index}"
            shapes |= {f"{conv}.weight": (c_out, fan_in, 3, 3), f"{conv}.bias": (c_out,)}
            shapes |= {f"{bn}.{b}": (c_out,) for b in ("weight", "bias", "running_mean", "running_var")}
            shapes[f"{bn}.num_batches_tracked"] = ()
    return shapes | {"decoder.out_conv.weight": (num_classes, 16, 3, 3), "decoder.out_conv.bias": (num_classes,)}


def ssl4mis_forward(w: dict, x: torch.Tensor) -> torch.Tensor:
    """SSL4MIS UNet's eval-mode forward, written with torch.nn.functional from its state dict ``w``."""

    def block(x, prefix):
        for conv, bn in ((0, 1), (4, 5)):
            x = F.conv2d(x, w[f"{prefix}.conv_conv.{conv}.weight"], w[f"{prefix}.conv_conv.{conv}.bias"], padding=1)
            x = F.batch_norm(x, w[f"{prefix}.conv_conv.{bn}.running_mean"], w[f"{prefix}.conv_conv.{bn}.running_var"],
                             w[f"{prefix}.conv_conv.{bn}.weight"], w[f"{prefix}.conv_conv.{bn}.bias"], training=False)
            x = F.leaky_relu(x, 0.01)
        return x

    stages = [block(x, "encoder.in_conv")]
    for k in range(1, 5):
        stages.append(block(F.max_pool2d(stages[-1], 2), f"encoder.down{k}.maxpool_conv.1"))
    x = stages.pop()
    for k in range(1, 5):
        up = F.conv2d(x, w[f"decoder.up{k}.conv1x1.weight"], w[f"decoder.up{k}.conv1x1.bias"])
        up = F.interpolate(up, scale_factor=2, mode="bilinear", align_corners=True)
        x = block(torch.cat([stages.pop(), up], 1), f"decoder.up{k}.conv")  # the skip first
    return F.conv2d(x, w["decoder.out_conv.weight"], w["decoder.out_conv.bias"], padding=1)


def test_state_dict_names_and_shapes_are_ssl4mis():
    for num_classes in (4, 2):
        state = UNet2D(num_classes=num_classes).state_dict()
        assert {k: tuple(v.shape) for k, v in state.items()} == ssl4mis_state_shapes(num_classes)
        assert list(state) == list(ssl4mis_state_shapes(num_classes))  # same construction order
    dropout = {n: m.p for n, m in UNet2D().named_modules() if isinstance(m, nn.Dropout)}
    assert dropout == DROPOUT  # the encoder only, between the two convs of each block
    assert not any(isinstance(m, nn.Dropout) for m in UNet2D(dropout=False).modules())


def test_parameter_count():
    params = list(UNet2D().parameters())
    assert sum(p.numel() for p in params) == 1_813_764 and len(params) == 82
    assert sum(p.numel() for p in UNet2D(num_classes=2).parameters()) == 1_813_474
    assert sum(p.numel() for p in UNet2D(dropout=False).parameters()) == 1_813_764  # dropout has no parameters
    assert [m.out_channels for m in UNet2D(n_filters=2).encoder.modules() if isinstance(m, nn.Conv2d)][::2] == \
        [2, 4, 8, 16, 32]  # stage k: n_filters * 2**k


def test_ssl4mis_weights_load_strictly_and_give_their_forward(tmp_path):
    """A checkpoint saved under SSL4MIS's names loads with strict=True; the network then computes SSL4MIS's forward."""
    torch.manual_seed(2)
    shapes = ssl4mis_state_shapes()
    saved = {k: torch.tensor(0) if not s else torch.rand(s) + 0.5 if k.endswith("running_var") else torch.randn(s) * 0.2
             for k, s in shapes.items()}
    torch.save(saved, tmp_path / "ssl4mis_unet.pth")
    weights = torch.load(tmp_path / "ssl4mis_unet.pth", weights_only=True)
    model = UNet2D().eval()
    result = model.load_state_dict(weights, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 1, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ssl4mis_forward(weights, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("num_classes", [2, 4])
def test_forward_shape(num_classes):
    m = UNet2D(in_channels=2, num_classes=num_classes, n_filters=2)
    assert m(torch.randn(2, 2, 32, 48)).shape == (2, num_classes, 32, 48)


def test_bad_input_names_what_was_expected():
    m = UNet2D(n_filters=2)
    with pytest.raises(ValueError, match=r"UNet2D: expected input \(B, 1, H, W\)"):
        m(torch.randn(1, 2, 16, 16))
    with pytest.raises(ValueError, match=r"UNet2D: expected input \(B, 1, H, W\), got \(1, 1, 16, 16, 16\)"):
        m(torch.randn(1, 1, 16, 16, 16))
    with pytest.raises(ValueError, match="multiples of 16"):
        m(torch.randn(1, 1, 16, 24))
    with pytest.raises(ValueError, match="num_classes >= 2"):
        UNet2D(num_classes=1)
    with pytest.raises(ValueError, match="n_filters <= 128"):
        UNet2D(n_filters=129)
    with pytest.raises(ValueError, match="bn_groups"):
        m.bn_groups = 0


def test_dropout_and_mc_dropout():
    m = UNet2D(n_filters=2).eval()
    x = torch.randn(1, 1, 32, 32)
    assert torch.equal(m(x), m(x))  # eval: deterministic
    with mc_dropout(m):
        assert not m.training
        a, b = m(x), m(x)
    assert not torch.equal(a, b)  # dropout on in eval mode
    assert torch.equal(m(x), m(x)) and not m.training  # restored
    m.train()
    assert not torch.equal(m(x), m(x))  # the teacher's training-mode passes are stochastic too
    vanilla = UNet2D(n_filters=2, dropout=False).eval()
    with mc_dropout(vanilla):
        assert torch.equal(vanilla(x), vanilla(x))


def test_ghost_batch_norm_equals_separate_forwards():
    """G passes stacked in one batch with bn_groups=G see the statistics of G separate forwards."""
    torch.manual_seed(1)
    m = UNet2D(n_filters=2, dropout=False).train()
    separate = copy.deepcopy(m)
    x = torch.randn(6, 1, 64, 48)
    m.bn_groups = 3
    assert m.bn_groups == 3 and all(bn.groups == 3 for bn in m.modules() if isinstance(bn, nn.BatchNorm2d))
    stacked = m(x)
    torch.testing.assert_close(stacked, torch.cat([separate(c) for c in x.chunk(3)]), rtol=1e-4, atol=1e-4)
    # running statistics move once, by the average of the per-chunk statistics (unbiased variance)
    bn = m.encoder.in_conv.conv_conv[1]
    with torch.no_grad():
        h = m.encoder.in_conv.conv_conv[0](x).unflatten(0, (3, 2))  # BN input, (G, b, C, H, W)
        n = h[0].numel() // h.shape[2]
        var, mean = torch.var_mean(h, dim=(1, 3, 4), correction=0)
    assert int(bn.num_batches_tracked) == 1
    torch.testing.assert_close(bn.running_mean, 0.1 * mean.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * var.mean(0) * n / (n - 1), rtol=1e-5, atol=1e-6)
    m.bn_groups = 1  # plain batch norm again
    torch.testing.assert_close(m(x), separate(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not divisible"):
        m.bn_groups = 4
        m(x)


def test_channels_last_and_full_res_memory_format_match():
    m = UNet2D(n_filters=2).eval()
    x = torch.randn(2, 1, 32, 32)
    ref = m(x)
    m_cl = copy.deepcopy(m).to(memory_format=torch.channels_last)
    torch.testing.assert_close(m_cl(x.to(memory_format=torch.channels_last)), ref, rtol=1e-4, atol=1e-5)
    mixed = m_cl.full_res_memory_format_(torch.contiguous_format)
    assert mixed.layer_formats == (torch.contiguous_format, torch.channels_last)
    assert mixed.encoder.in_conv.conv_conv[4].weight.is_contiguous()
    assert mixed.decoder.out_conv.weight.is_contiguous()
    w = mixed.encoder.down1.maxpool_conv[1].conv_conv[0].weight
    assert w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    torch.testing.assert_close(mixed(x), ref, rtol=1e-4, atol=1e-5)


def test_gradient_reaches_every_parameter():
    m = UNet2D(n_filters=2).train()
    logits = m(torch.randn(2, 1, 32, 32))
    F.cross_entropy(logits, torch.randint(0, 4, (2, 32, 32))).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_public_names():
    assert uamt_fast.UNet2D is UNet2D and uamt_fast.nets.UNet2D is UNet2D
