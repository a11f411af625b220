"""V-Net: the paper's backbone, pinned by its exact parameter count, plus ghost batch norm and MC dropout."""
import pytest
import torch

from uamt_fast import VNet, mc_dropout


def test_parameter_count_is_the_papers():
    model = VNet(in_channels=1, num_classes=2, n_filters=16, dropout=True)
    params = list(model.parameters())
    assert sum(p.numel() for p in params) == 9_448_866
    assert len(params) == 118
    # dropout has no parameters: the "Vanilla V-Net" is the same network
    assert sum(p.numel() for p in VNet(dropout=False).parameters()) == 9_448_866


def test_state_dict_keys_follow_the_released_code():
    keys = VNet(n_filters=2).state_dict().keys()
    for k in ["block_one.conv.0.weight", "block_one.conv.1.running_mean", "block_one_dw.conv.0.weight",
              "block_five.conv.6.weight", "block_five_up.conv.0.weight", "block_nine.conv.0.bias",
              "out_conv.weight", "out_conv.bias"]:
        assert k in keys


def test_stage_layout():
    m = VNet(n_filters=2)
    n_convs = {name: sum(isinstance(x, torch.nn.Conv3d) for x in getattr(m, name).modules())
               for name in ["block_one", "block_two", "block_three", "block_four", "block_five",
                            "block_six", "block_seven", "block_eight", "block_nine"]}
    assert list(n_convs.values()) == [1, 2, 3, 3, 3, 3, 3, 2, 1]
    assert isinstance(m.block_five_up.conv[0], torch.nn.ConvTranspose3d)
    assert m.block_one_dw.conv[0].stride == (2, 2, 2) and m.block_one_dw.conv[0].kernel_size == (2, 2, 2)


@pytest.mark.parametrize("num_classes", [2, 4])
def test_forward_shape(num_classes):
    m = VNet(in_channels=2, num_classes=num_classes, n_filters=2)
    y = m(torch.randn(2, 2, 16, 32, 48))
    assert y.shape == (2, num_classes, 16, 32, 48)


def test_bad_input_names_what_was_expected():
    m = VNet(n_filters=2)
    with pytest.raises(ValueError, match=r"expected input \(B, 1, D, H, W\)"):
        m(torch.randn(1, 2, 16, 16, 16))
    with pytest.raises(ValueError, match="multiples of 16"):
        m(torch.randn(1, 1, 16, 16, 20))
    with pytest.raises(ValueError, match="num_classes >= 2"):
        VNet(num_classes=1)
    with pytest.raises(ValueError, match="bn_groups"):
        m.bn_groups = 0


def test_dropout_and_mc_dropout():
    m = VNet(n_filters=2).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    assert torch.equal(m(x), m(x))  # eval: deterministic
    with mc_dropout(m):
        assert not m.training
        a, b = m(x), m(x)
    assert not torch.equal(a, b)  # dropout on in eval mode
    assert torch.equal(m(x), m(x)) and not m.mc_dropout  # restored
    vanilla = VNet(n_filters=2, dropout=False).eval()
    with mc_dropout(vanilla):
        assert torch.equal(vanilla(x), vanilla(x))


def test_mc_dropout_on_plain_dropout_modules():
    net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Dropout(0.5)).eval()
    x = torch.randn(4, 8)
    with mc_dropout(net):
        assert net[1].training and not net[0].training
        assert not torch.equal(net(x), net(x))
    assert not net[1].training


def test_ghost_batch_norm_equals_separate_forwards():
    """G passes stacked in one batch with bn_groups=G see the statistics of G separate forwards."""
    torch.manual_seed(1)
    m = VNet(n_filters=2, dropout=False).train()
    x = torch.randn(6, 1, 16, 16, 32)
    separate = VNet(n_filters=2, dropout=False).train()
    separate.load_state_dict(m.state_dict())

    m.bn_groups = 3
    stacked = m(x)
    ref = torch.cat([separate(c) for c in x.chunk(3)])
    torch.testing.assert_close(stacked, ref, rtol=1e-4, atol=1e-4)
    # running statistics move once, by the average of the per-chunk statistics (unbiased variance)
    bn = m.block_one.conv[1]
    with torch.no_grad():
        h = m.block_one.conv[0](x).unflatten(0, (3, 2))  # BN input, (G, b, C, D, H, W)
        n = h[0].numel() // h.shape[2]
        var, mean = torch.var_mean(h, dim=(1, 3, 4, 5), correction=0)
    assert int(bn.num_batches_tracked) == 1
    torch.testing.assert_close(bn.running_mean, 0.1 * mean.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * var.mean(0) * n / (n - 1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not divisible"):
        m(torch.randn(4, 1, 16, 16, 16))


def test_ghost_batch_norm_with_one_group_is_batch_norm():
    m = VNet(n_filters=2, dropout=False).train()
    ref = VNet(n_filters=2, dropout=False).train()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 1, 16, 16, 16)
    m.bn_groups = 1
    assert torch.equal(m(x), ref(x))


def test_channels_last_3d_matches():
    m = VNet(n_filters=2).eval()
    x = torch.randn(2, 1, 16, 16, 16)
    ref = m(x)
    m_cl = m.to(memory_format=torch.channels_last_3d)
    torch.testing.assert_close(m_cl(x.to(memory_format=torch.channels_last_3d)), ref, rtol=1e-4, atol=1e-5)
