"""V-Net: the paper's backbone, pinned by its exact parameter count, plus ghost batch norm and MC dropout."""
import copy

import pytest
import torch
import torch.nn as nn

import uamt_fast
from uamt_fast import GhostBatchNorm2d, GhostBatchNorm3d, VNet, mc_dropout


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


# ---------------------------------------------------------------------------------------------
# ghost batch norm, any model: per-pass statistics for 2D and 3D
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ghost_cls, bn_cls, spatial", [(GhostBatchNorm2d, nn.BatchNorm2d, (5, 6)),
                                                        (GhostBatchNorm3d, nn.BatchNorm3d, (3, 4, 5))])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_ghost_batch_norm_equals_per_pass_batch_norm(ghost_cls, bn_cls, spatial, momentum):
    """G stacked passes through one ghost layer == each pass through its own nn.BatchNorm (train
    mode): same outputs; the running statistics move once, to the average of the per-pass ones."""
    G, b, C = 3, 2, 4
    ref = bn_cls(C, momentum=momentum).train()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5), ref.bias.uniform_(-0.5, 0.5)
        ref.running_mean.uniform_(-1, 1), ref.running_var.uniform_(0.5, 2)
    ghost = ghost_cls(C, momentum=momentum).train()
    ghost.load_state_dict(ref.state_dict())
    ghost.groups = G
    x = torch.randn(G * b, C, *spatial) * 3 + 1
    per_pass = [copy.deepcopy(ref) for _ in range(G)]
    expected = torch.cat([bn(chunk) for bn, chunk in zip(per_pass, x.chunk(G))])
    torch.testing.assert_close(ghost(x), expected, rtol=1e-5, atol=1e-5)
    for name in ("running_mean", "running_var"):
        average = torch.stack([getattr(bn, name) for bn in per_pass]).mean(0)
        torch.testing.assert_close(getattr(ghost, name), average, rtol=1e-5, atol=1e-6, msg=name)
    assert int(ghost.num_batches_tracked) == 1
    ghost.eval(), ref.eval()  # eval: the running statistics, exactly nn.BatchNorm
    ghost.load_state_dict(ref.state_dict())
    assert torch.equal(ghost(x), ref(x))


def test_ghost_batch_norm_without_affine_or_running_stats():
    x = torch.randn(4, 3, 5, 5)
    ghost = GhostBatchNorm2d(3, affine=False, track_running_stats=False)
    ghost.groups = 2
    expected = torch.cat([nn.functional.batch_norm(c, None, None, training=True) for c in x.chunk(2)])
    torch.testing.assert_close(ghost.train()(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ghost.eval()(x), expected, rtol=1e-5, atol=1e-5)  # batch statistics in eval too


def test_ghost_batch_norm_conversion_keeps_the_model():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))
    params = [id(p) for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert uamt_fast.ghost_batch_norm_(model) is model
    assert [type(model[i]) for i in (1, 4)] == [GhostBatchNorm2d, GhostBatchNorm2d]
    assert [id(p) for p in model.parameters()] == params
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert uamt_fast.set_bn_groups(model, 2) == 2 and model[4].groups == 2
    x = torch.randn(4, 1, 8, 8)
    stacked = model.train()(x)
    uamt_fast.set_bn_groups(model, 1)
    torch.testing.assert_close(stacked, torch.cat([model(c) for c in x.chunk(2)]), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="positive integer"):
        uamt_fast.set_bn_groups(model, 0)
    with pytest.raises(TypeError, match="positive integer"):
        uamt_fast.set_bn_groups(model, 2.0)
    with pytest.raises(ValueError, match="no GhostBatchNorm2d/3d layers"):
        uamt_fast.set_bn_groups(nn.Sequential(nn.BatchNorm2d(2)), 2)
    with pytest.raises(ValueError, match="GhostBatchNorm2d: batch of 3 is not divisible into groups=2"):
        uamt_fast.set_bn_groups(model, 2)
        model(torch.randn(3, 1, 8, 8))
