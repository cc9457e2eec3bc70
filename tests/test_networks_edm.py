"""EDM networks (models/networks_edm.py): official names and shapes, and small real forwards.

* The three published EDM checkpoints' manifests (fixtures/edm-*.json) are compared with our
  networks built on the meta device: every state-dict key and shape, the parameter count and
  every named module's class name must be equal.
* Tiny networks with real (randomised) weights run on the CPU in float32: shapes, finiteness,
  determinism, per-sample independence, and the preconditioning formulas of VP / VE / EDM.
* The module source must run standalone, as NVIDIA's persistence pickles re-execute it.
"""

import math
import os

import pytest
import torch

from models import networks_edm as ne

from tests.manifests import assert_matches_manifest, load_manifest

# (fixture name, the enc block that feeds the AMED predictor, its channel count at 8x8).
MANIFESTS = [
    ('edm-cifar10-32x32-uncond-vp', '8x8_block3', 256),
    ('edm-ffhq-64x64-uncond-vp', '8x8_block3', 256),
    ('edm-imagenet-64x64-cond-adm', '8x8_block2', 768),
]

pytestmark = pytest.mark.usefixtures('single_thread')






# ---------------------------------------------------------------------------------------------
# Official names and shapes (meta device: no memory).


@pytest.mark.parametrize('name,hook_block,hook_channels', MANIFESTS)
def test_manifest_matches(name, hook_block, hook_channels):
    manifest = load_manifest(name)
    net = ne.build_from_config(manifest['config'])
    assert all(t.device.type == 'meta' for t in net.state_dict().values())

    assert_matches_manifest(net, manifest)

    assert hook_block in net.model.enc


@pytest.mark.parametrize('name,hook_block,hook_channels', MANIFESTS)
def test_manifest_forward_shapes_on_meta(name, hook_block, hook_channels):
    """A full-size forward on the meta device: output shape and the AMED hook's 8x8 activation."""
    config = load_manifest(name)['config']
    net = ne.build_from_config(config).eval()
    seen = []
    handle = net.model.enc[hook_block].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    res, ch = config['img_resolution'], config['img_channels']
    x = torch.empty(2, ch, res, res, device='meta')
    labels = torch.empty(2, config['label_dim'], device='meta') if config['label_dim'] else None
    y = net(x, torch.empty(2, device='meta'), labels)
    handle.remove()
    assert y.shape == x.shape and y.dtype == torch.float32
    assert seen == [torch.Size([2, hook_channels, 8, 8])]


def test_manifest_precond_attributes():
    vp = ne.build_from_config(load_manifest('edm-cifar10-32x32-uncond-vp')['config'])
    assert type(vp).__name__ == 'VPPrecond'
    assert (vp.img_resolution, vp.img_channels, vp.label_dim, vp.use_fp16) == (32, 3, 0, False)
    assert (vp.beta_d, vp.beta_min, vp.M, vp.epsilon_t) == (19.9, 0.1, 1000, 1e-5)
    # EDM evaluates sigma(t) in float32: sigma(1e-5) rounds to 2^-10.
    assert vp.sigma_min == 0.0009765625
    assert vp.sigma_max == pytest.approx(152.16697, rel=1e-6)
    edm = ne.build_from_config(load_manifest('edm-imagenet-64x64-cond-adm')['config'])
    assert type(edm).__name__ == 'EDMPrecond'
    assert (edm.sigma_min, edm.sigma_max, edm.sigma_data, edm.label_dim) == (0, float('inf'), 0.5, 1000)


def test_build_from_config_rejects_unknown_names():
    with pytest.raises(ValueError):
        ne.build_from_config(dict(precond='Nope', img_resolution=8, img_channels=3))
    with pytest.raises(ValueError):
        ne.build_from_config(dict(precond='VPPrecond', model_type='Nope', img_resolution=8, img_channels=3))


# ---------------------------------------------------------------------------------------------
# Tiny networks with real weights.

TINY_SONG = dict(img_resolution=16, img_channels=3, model_channels=16, channel_mult=[1, 2], num_blocks=1,
                 attn_resolutions=[8], augment_dim=9, dropout=0.1)
TINY_ADM = dict(img_resolution=16, img_channels=3, label_dim=10, model_channels=32, channel_mult=[1, 2],
                num_blocks=1, attn_resolutions=[8], channel_mult_emb=2, dropout=0.1)


def randomise(net, seed=0):
    """Redraw every parameter so that every output depends on it (EDM's zero-init layers would
    otherwise make F nearly zero): weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2), GroupNorm
    scales ~ 1 + N(0, 0.1^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif 'norm' in name and name.endswith('weight'):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return net.eval()


def make_tiny(precond, model, seed=0, **overrides):
    kwargs = dict(TINY_SONG if model == 'SongUNet' else TINY_ADM)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    net = getattr(ne, precond)(model_type=model, **kwargs)
    return randomise(net, seed)


def inputs(net, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, net.img_channels, net.img_resolution, net.img_resolution, generator=g)
    sigma = torch.tensor([0.5, 2.0, 0.05, 5.0])[:batch]
    labels = None
    if net.label_dim:
        classes = torch.tensor([3, 7, 1, 0])[:batch] % net.label_dim
        labels = torch.nn.functional.one_hot(classes, net.label_dim).float()
    return x, sigma, labels


CASES = [('VPPrecond', 'SongUNet'), ('VEPrecond', 'SongUNet'), ('EDMPrecond', 'DhariwalUNet'),
         ('EDMPrecond', 'SongUNet'), ('VPPrecond', 'DhariwalUNet')]


@pytest.mark.parametrize('precond,model', CASES)
def test_tiny_forward(precond, model):
    net = make_tiny(precond, model)
    x, sigma, labels = inputs(net)
    with torch.no_grad():
        d = net(x, sigma, labels)
        d_again = net(x, sigma, labels)
        d_first = net(x[:1], sigma[:1], None if labels is None else labels[:1])
        d_second = net(x[1:], sigma[1:], None if labels is None else labels[1:])
    assert d.shape == x.shape and d.dtype == torch.float32
    assert torch.isfinite(d).all()
    assert torch.equal(d, d_again)
    torch.testing.assert_close(d_first, d[:1], atol=1e-5, rtol=0)
    torch.testing.assert_close(d_second, d[1:], atol=1e-5, rtol=0)
    # The output really depends on the input, the noise level and (if any) the label.
    with torch.no_grad():
        assert not torch.allclose(net(x, sigma.flip(0), labels), d)
        if labels is not None:
            assert not torch.allclose(net(x, sigma, labels.flip(0)), d)


def inner(net, x, c_in, c_noise, labels):
    """The backbone's raw output F for the given c_in and c_noise."""
    with torch.no_grad():
        return net.model(c_in * x, c_noise.flatten(), class_labels=labels)


def test_vp_precond_formulas():
    net = make_tiny('VPPrecond', 'SongUNet')
    x, sigma, _ = inputs(net)
    s = sigma.reshape(-1, 1, 1, 1)
    beta_d, beta_min = 19.9, 0.1
    t = ((beta_min ** 2 + 2 * beta_d * torch.log(1 + s ** 2)).sqrt() - beta_min) / beta_d
    c_in, c_out, c_skip, c_noise = 1 / (s ** 2 + 1).sqrt(), -s, 1, 999 * t
    expected = c_skip * x + c_out * inner(net, x, c_in, c_noise, None)
    with torch.no_grad():
        torch.testing.assert_close(net(x, sigma), expected, atol=1e-5, rtol=1e-5)
    # sigma and sigma_inv are inverses; sigma_min/max are sigma(epsilon_t) and sigma(1).
    tt = torch.tensor([1e-3, 0.1, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(net.sigma_inv(net.sigma(tt)), tt)
    assert net.sigma_max == float(net.sigma(torch.tensor(1.0)))
    assert net.sigma_min == float(net.sigma(torch.tensor(1e-5)))


def test_ve_precond_formulas():
    net = make_tiny('VEPrecond', 'SongUNet')
    x, sigma, _ = inputs(net)
    s = sigma.reshape(-1, 1, 1, 1)
    expected = x + s * inner(net, x, 1, torch.log(0.5 * s), None)
    with torch.no_grad():
        torch.testing.assert_close(net(x, sigma), expected, atol=1e-5, rtol=1e-5)
    assert (net.sigma_min, net.sigma_max) == (0.02, 100)


def test_edm_precond_formulas():
    net = make_tiny('EDMPrecond', 'DhariwalUNet')
    x, sigma, labels = inputs(net)
    s = sigma.reshape(-1, 1, 1, 1)
    sd = 0.5
    c_skip = sd ** 2 / (s ** 2 + sd ** 2)
    c_out = s * sd / (s ** 2 + sd ** 2).sqrt()
    c_in = 1 / (s ** 2 + sd ** 2).sqrt()
    c_noise = torch.log(s) / 4
    expected = c_skip * x + c_out * inner(net, x, c_in, c_noise, labels)
    with torch.no_grad():
        torch.testing.assert_close(net(x, sigma, labels), expected, atol=1e-5, rtol=1e-5)
        # Missing labels of a conditional network mean all-zero labels.
        zeros = torch.zeros(x.shape[0], net.label_dim)
        torch.testing.assert_close(net(x, sigma), net(x, sigma, zeros), atol=1e-6, rtol=0)


def test_precond_accepts_scalar_sigma_and_ignores_fp16_on_cpu():
    net = make_tiny('EDMPrecond', 'DhariwalUNet', use_fp16=True)
    x, _, labels = inputs(net)
    with torch.no_grad():
        a = net(x, torch.tensor(2.0), labels)
        b = net(x, torch.full([2], 2.0), labels)
        c = net(x, 2.0, labels, force_fp32=True)
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # a (1,) vs (B,) embedding: rounding only
    torch.testing.assert_close(a, c, atol=0, rtol=0)
    assert torch.equal(net.round_sigma(torch.tensor([0.3])), torch.tensor([0.3]))


@pytest.mark.parametrize('precond,model', [('EDMPrecond', 'DhariwalUNet'), ('VPPrecond', 'SongUNet')])
def test_backbone_half_precision_dtype_flow(precond, model):
    """What the CUDA fp16 path runs (no GPU here): float16 activations with float32 parameters
    give a float16 output close to the float32 one."""
    net = make_tiny(precond, model)
    x, sigma, labels = inputs(net)
    with torch.no_grad():
        half = net.model(x.half(), sigma.log() / 4, class_labels=labels)
        full = net.model(x, sigma.log() / 4, class_labels=labels)
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    assert (half.float() - full).abs().max() <= 1e-2 * full.abs().max()


def test_augment_labels_change_song_output():
    net = make_tiny('VPPrecond', 'SongUNet')
    x, sigma, _ = inputs(net)
    with torch.no_grad():
        plain = net(x, sigma)
        zero_aug = net(x, sigma, augment_labels=torch.zeros(2, 9))
        aug = net(x, sigma, augment_labels=torch.ones(2, 9))
    torch.testing.assert_close(plain, zero_aug)
    assert not torch.allclose(plain, aug)


@pytest.mark.parametrize('variant', [
    dict(embedding_type='fourier', channel_mult_noise=2, encoder_type='residual', resample_filter=[1, 3, 3, 1]),
    dict(encoder_type='skip', decoder_type='skip'),
    dict(encoder_type='skip', decoder_type='skip', resample_filter=[1, 3, 3, 1], label_dim=4),
])
def test_song_unet_variants(variant):
    """NCSN++-style options (Fourier embedding, residual / skip encoders, skip decoder, the
    bilinear [1, 3, 3, 1] filter) build and run, still batch-independent."""
    net = make_tiny('VEPrecond', 'SongUNet', **variant)
    if 'label_dim' in variant:
        assert net.model.map_label is not None
    x, sigma, labels = inputs(net)
    with torch.no_grad():
        d = net(x, sigma, labels)
        d_first = net(x[:1], sigma[:1], None if labels is None else labels[:1])
    assert d.shape == x.shape and torch.isfinite(d).all()
    torch.testing.assert_close(d_first, d[:1], atol=1e-5, rtol=0)
    names = set(net.model.enc) | set(net.model.dec)
    if variant.get('encoder_type') == 'skip':
        assert {'8x8_aux_down', '8x8_aux_skip'} <= names
    if variant.get('encoder_type') == 'residual':
        assert '8x8_aux_residual' in names
    if variant.get('decoder_type') == 'skip':
        assert {'16x16_aux_up', '16x16_aux_norm', '16x16_aux_conv', '8x8_aux_norm', '8x8_aux_conv'} <= names


def test_dropout_only_in_training_mode():
    net = make_tiny('EDMPrecond', 'DhariwalUNet', dropout=0.5)
    x, sigma, labels = inputs(net)
    with torch.no_grad():
        evals = [net(x, sigma, labels) for _ in range(2)]
        net.train()
        torch.manual_seed(0)
        train = net(x, sigma, labels)
    assert torch.equal(evals[0], evals[1])
    assert not torch.allclose(train, evals[0])


def test_backward_through_attention():
    """AttentionOp (float32 inside) and its hand-written backward agree with autograd through
    a plain softmax."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 8, 5, generator=g, requires_grad=True)
    k = torch.randn(3, 8, 6, generator=g, requires_grad=True)
    upstream = torch.randn(3, 5, 6, generator=g)
    w = ne.AttentionOp.apply(q, k)
    dq, dk = torch.autograd.grad((w * upstream).sum(), (q, k))
    ref = torch.einsum('ncq,nck->nqk', q, k / math.sqrt(8)).softmax(dim=2)
    ref_dq, ref_dk = torch.autograd.grad((ref * upstream).sum(), (q, k))
    torch.testing.assert_close(w, ref)
    torch.testing.assert_close(dq, ref_dq)
    torch.testing.assert_close(dk, ref_dk)
    # A whole network trains: gradients reach every parameter.
    net = make_tiny('VPPrecond', 'SongUNet')
    x, sigma, _ = inputs(net)
    net(x, sigma, augment_labels=torch.randn(2, 9)).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


# ---------------------------------------------------------------------------------------------
# Building blocks.


def test_conv2d_resampling_with_box_filter():
    x = torch.randn(2, 3, 8, 8)
    down = ne.Conv2d(3, 3, kernel=0, down=True)
    up = ne.Conv2d(3, 3, kernel=0, up=True)
    assert down.weight is None and down.resample_filter.shape == (1, 1, 2, 2)
    torch.testing.assert_close(down(x), torch.nn.functional.avg_pool2d(x, 2))
    torch.testing.assert_close(up(x), torch.nn.functional.interpolate(x, scale_factor=2, mode='nearest'))
    plain = ne.Conv2d(3, 5, kernel=3)
    assert plain.resample_filter is None and 'resample_filter' not in plain.state_dict()


@pytest.mark.parametrize('taps', [[1, 1], [1, 3, 3, 1]])
def test_conv2d_fused_matches_unfused_in_shape_and_mean(taps):
    x = torch.randn(2, 4, 8, 8)
    torch.manual_seed(0)
    for kw in [dict(up=True), dict(down=True)]:
        fused = ne.Conv2d(4, 6, kernel=3, resample_filter=taps, fused_resample=True, **kw)
        plain = ne.Conv2d(4, 6, kernel=3, resample_filter=taps, **kw)
        plain.load_state_dict(fused.state_dict())
        size = 16 if 'up' in kw else 4
        assert fused(x).shape == plain(x).shape == (2, 6, size, size)
    # The filter has unit DC gain: a constant image stays constant away from the borders.
    f = ne.Conv2d(1, 1, kernel=0, up=True, resample_filter=taps)
    y = f(torch.ones(1, 1, 8, 8))
    torch.testing.assert_close(y[..., 2:-2, 2:-2], torch.ones_like(y[..., 2:-2, 2:-2]))


def test_weight_init_and_layer_conventions():
    torch.manual_seed(0)
    w = ne.weight_init([400, 300], 'kaiming_uniform', fan_in=300, fan_out=400)
    assert w.abs().max() <= math.sqrt(3 / 300)
    w = ne.weight_init([400, 300], 'xavier_uniform', fan_in=300, fan_out=400)
    assert w.abs().max() <= math.sqrt(6 / 700)
    assert ne.weight_init([4000, 300], 'kaiming_normal', 300, 4000).std().item() == pytest.approx(
        math.sqrt(1 / 300), rel=0.02)
    assert ne.weight_init([4000, 300], 'xavier_normal', 300, 4000).std().item() == pytest.approx(
        math.sqrt(2 / 4300), rel=0.02)
    with pytest.raises(ValueError):
        ne.weight_init([2], 'nope', 1, 1)
    lin = ne.Linear(5, 7)
    assert torch.equal(lin.bias, torch.zeros(7))
    assert ne.Linear(5, 7, bias=False).bias is None
    gn = ne.GroupNorm(16)
    assert gn.num_groups == 4  # at least 4 channels per group
    assert ne.GroupNorm(256).num_groups == 32
    # Zero-initialised output layers: DhariwalUNet's out_conv is exactly zero, SongUNet's
    # conv1/proj/aux_conv weights are scaled by 1e-5.
    torch.manual_seed(0)
    adm = ne.DhariwalUNet(img_resolution=8, in_channels=3, out_channels=3, model_channels=64,
                          channel_mult=[1], num_blocks=1, attn_resolutions=[8])
    assert adm.out_conv.weight.abs().max() == 0 and adm.enc['8x8_block0'].proj.weight.abs().max() == 0
    song = ne.SongUNet(img_resolution=8, in_channels=3, out_channels=3, model_channels=16,
                       channel_mult=[1], num_blocks=1, attn_resolutions=[8])
    assert 0 < song.dec['8x8_aux_conv'].weight.abs().max() < 1e-4


def test_positional_embedding():
    x = torch.tensor([0.0, 1.0, 250.0])
    emb = ne.PositionalEmbedding(8, endpoint=True)(x)
    freqs = (1 / 10000) ** (torch.arange(4) / 3)
    torch.testing.assert_close(emb, torch.cat([torch.cos(x[:, None] * freqs), torch.sin(x[:, None] * freqs)], 1))
    emb = ne.PositionalEmbedding(8)(x)
    freqs = (1 / 10000) ** (torch.arange(4) / 4)
    torch.testing.assert_close(emb, torch.cat([torch.cos(x[:, None] * freqs), torch.sin(x[:, None] * freqs)], 1))
    fourier = ne.FourierEmbedding(8)
    assert fourier.freqs.shape == (4,) and 'freqs' in fourier.state_dict()
    assert fourier(x).shape == (3, 8)


# ---------------------------------------------------------------------------------------------
# Standalone source.


def test_module_source_execs_standalone():
    path = ne.__file__
    with open(path) as f:
        src = f.read()
    from torch_utils import persistence
    namespace = persistence._src_to_module(src).__dict__   # how a pickle re-executes it
    for name in ['Linear', 'Conv2d', 'GroupNorm', 'AttentionOp', 'UNetBlock', 'PositionalEmbedding',
                 'FourierEmbedding', 'SongUNet', 'DhariwalUNet', 'VPPrecond', 'VEPrecond', 'EDMPrecond',
                 'build_from_config', 'weight_init']:
        assert name in namespace
    # No imports beyond numpy, torch and the persistence module (what an EDM pickle provides).
    imports = [line.strip() for line in src.splitlines() if line.startswith(('import ', 'from '))]
    assert all(line.split()[1].split('.')[0] in ('numpy', 'torch', 'torch_utils') for line in imports), imports
    # The re-executed classes build and run on their own.
    torch.manual_seed(0)
    net = namespace['EDMPrecond'](img_resolution=8, img_channels=3, model_type='SongUNet', model_channels=16,
                                  channel_mult=[1], num_blocks=1, attn_resolutions=[8]).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 8, 8), torch.ones(1)).shape == (1, 3, 8, 8)
