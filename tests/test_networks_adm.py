"""ADM / Consistency-Models networks (models/networks_adm.py): official names, small forwards.

* The manifests of the official checkpoints (fixtures/adm-256x256_diffusion.json,
  adm-256x256_classifier.json, cm-edm_bedroom256_ema.json) are compared with our networks
  built on the meta device from the same option dictionaries: every state-dict key and shape,
  the parameter count and every named module's class name must be equal.
* Full-size forwards on the meta device check the output shapes and the shape of the AMED
  feature hook (``middle_block``: (B, 1024, 8, 8) at 256x256).
* Tiny networks with random weights run on the CPU in float32: shapes, finiteness,
  determinism, per-sample independence, the fp16 conversion, a state-dict round trip, and the
  attention math (legacy / new / Consistency-Models channel orders against a reference).
"""

import math
import os
import runpy

import pytest
import torch
import torch.nn.functional as F

from models import networks_adm as na

from tests.manifests import assert_matches_manifest, load_manifest

pytestmark = pytest.mark.usefixtures('single_thread')

# (fixture name, factory)
MANIFESTS = [
    ('adm-256x256_diffusion', na.create_adm_unet),
    ('adm-256x256_classifier', na.create_adm_classifier),
    ('cm-edm_bedroom256_ema', na.create_cm_unet),
]






# ---------------------------------------------------------------------------------------------
# Official names and shapes (meta device: no memory).


@pytest.mark.parametrize('name,factory', MANIFESTS)
def test_manifest_matches(name, factory):
    manifest = load_manifest(name)
    with torch.device('meta'):
        net = factory(manifest['config'])
    assert all(t.device.type == 'meta' for t in net.state_dict().values())

    assert_matches_manifest(net, manifest)


@pytest.mark.parametrize('name,factory', [m for m in MANIFESTS if 'classifier' not in m[0]])
def test_manifest_unet_forward_and_hook_on_meta(name, factory):
    """Full-size U-Net forward on the meta device: output shape and the middle_block hook."""
    config = load_manifest(name)['config']
    with torch.device('meta'):
        net = factory(config)
        features = []
        handle = net.middle_block.register_forward_hook(lambda m, i, o: features.append(o))
        x = torch.empty(2, 3, 256, 256)
        y = torch.zeros(2, dtype=torch.long) if config['class_cond'] else None
        out = net(x, torch.ones(2), y)
        handle.remove()
    assert out.shape == (2, 6 if config['learn_sigma'] else 3, 256, 256)
    assert len(features) == 1 and features[0].shape == (2, 1024, 8, 8)


def test_manifest_classifier_forward_on_meta():
    config = load_manifest('adm-256x256_classifier')['config']
    with torch.device('meta'):
        net = na.create_adm_classifier(config)
        out = net(torch.empty(2, 3, 256, 256), torch.ones(2))
    assert out.shape == (2, 1000)
    assert net.out[2].positional_embedding.shape == (512, 8 * 8 + 1)


@pytest.mark.parametrize('name,factory', MANIFESTS)
def test_manifest_fp16_conversion_on_meta(name, factory):
    """convert_to_fp16 turns exactly the torso's convolutions to float16 (official rule)."""
    with torch.device('meta'):
        net = factory(load_manifest(name)['config'])
    net.convert_to_fp16()
    torso = ('input_blocks.', 'middle_block.', 'output_blocks.')
    conv_params = {f'{n}.{p}' for n, m in net.named_modules()
                   if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d))
                   for p, _ in m.named_parameters(recurse=False)}
    for key, value in net.state_dict().items():
        expected = torch.float16 if key.startswith(torso) and key in conv_params \
            else torch.float32
        assert value.dtype == expected, key
    net.convert_to_fp32()
    assert all(v.dtype == torch.float32 for v in net.state_dict().values())


# ---------------------------------------------------------------------------------------------
# Tiny networks with real weights.

TINY_UNET = dict(image_size=32, num_channels=32, num_res_blocks=1, num_heads=4,
                 num_heads_upsample=-1, num_head_channels=16, attention_resolutions='16,8',
                 channel_mult='1,2,2', dropout=0.1, class_cond=True, use_checkpoint=False,
                 use_scale_shift_norm=True, resblock_updown=True, use_fp16=True,
                 use_new_attention_order=False, learn_sigma=True)
TINY_CM = dict(TINY_UNET, class_cond=False, learn_sigma=False, use_scale_shift_norm=False)
TINY_CLASSIFIER = dict(image_size=32, classifier_use_fp16=True, classifier_width=32,
                       classifier_depth=1, classifier_attention_resolutions='16,8',
                       classifier_use_scale_shift_norm=True, classifier_resblock_updown=True,
                       classifier_pool='attention', classifier_channel_mult='1,2,2',
                       classifier_num_head_channels=16)
NUM_CLASSES = 10


def randomize_(net, seed=0):
    """Replace every parameter with random values (the official init zeroes the last conv of
    each branch, which would make the outputs trivially zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim > 1 and 'positional_embedding' not in name:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (1.0 if name.endswith(
                    ('norm.weight', 'layers.0.weight', 'out.0.weight')) else 0.0))
    return net


def make_tiny(kind, seed=0):
    """A tiny ``kind`` in {'adm', 'cm', 'classifier'} network, randomised, in eval mode."""
    if kind == 'adm':
        net = na.create_adm_unet(TINY_UNET, num_classes=NUM_CLASSES)
    elif kind == 'cm':
        net = na.create_cm_unet(TINY_CM)
    else:
        net = na.create_adm_classifier(TINY_CLASSIFIER, num_classes=NUM_CLASSES)
    return randomize_(net, seed).eval()


def tiny_inputs(kind, batch=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, 32, 32, generator=gen)
    t = torch.tensor([999.0, 3.25, 500.0, 0.0][:batch])  # fractional timesteps are allowed
    y = torch.tensor([3, 7, 0, 9][:batch]) if kind == 'adm' else None
    return x, t, y


def run(net, kind, x, t, y):
    return net(x, t) if kind == 'classifier' else net(x, t, y)


def expected_shape(kind, batch):
    return {'adm': (batch, 6, 32, 32), 'cm': (batch, 3, 32, 32),
            'classifier': (batch, NUM_CLASSES)}[kind]


@pytest.mark.parametrize('kind', ['adm', 'cm', 'classifier'])
def test_tiny_forward(kind):
    net = make_tiny(kind)
    x, t, y = tiny_inputs(kind)
    with torch.no_grad():
        out = run(net, kind, x, t, y)
        again = run(net, kind, x, t, y)
        single = run(net, kind, x[:1], t[:1], None if y is None else y[:1])
    assert out.shape == expected_shape(kind, 2) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.abs().max() > 1e-3  # not trivially zero
    assert torch.equal(out, again)  # deterministic
    torch.testing.assert_close(single, out[:1], atol=1e-5, rtol=1e-5)  # per-sample
    assert not torch.allclose(out[0], out[1])


@pytest.mark.parametrize('kind', ['adm', 'cm', 'classifier'])
def test_tiny_middle_block_hook(kind):
    net = make_tiny(kind)
    features = []
    handle = net.middle_block.register_forward_hook(lambda m, i, o: features.append(o))
    x, t, y = tiny_inputs(kind)
    with torch.no_grad():
        run(net, kind, x, t, y)
    handle.remove()
    # 32x32 with channel_mult (1, 2, 2): two downsamplings (ds = 4), 2 * 32 channels.
    assert len(features) == 1 and features[0].shape == (2, 64, 8, 8)


def test_tiny_unet_conditioning_matters():
    """The label and the timestep both change the output."""
    net = make_tiny('adm')
    x, t, y = tiny_inputs('adm')
    with torch.no_grad():
        base = net(x, t, y)
        other_label = net(x, t, (y + 1) % NUM_CLASSES)
        other_time = net(x, t + 100.0, y)
    assert not torch.allclose(base, other_label)
    assert not torch.allclose(base, other_time)


def test_tiny_unet_scalar_timestep_and_label_checks():
    net = make_tiny('adm')
    x, _, y = tiny_inputs('adm')
    with torch.no_grad():
        a = net(x, torch.tensor(250.0), y)
        b = net(x, torch.full((2,), 250.0), y)
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        net(x, torch.ones(2))  # class-conditional: labels are required
    with pytest.raises(ValueError):
        make_tiny('cm')(x, torch.ones(2), y)  # unconditional: labels are refused


@pytest.mark.parametrize('kind', ['adm', 'cm', 'classifier'])
def test_tiny_fp16_conversion(kind):
    """convert_to_fp16 changes exactly the torso's conv weights and biases; convert_to_fp32
    restores float32 (with the values rounded through float16)."""
    net = make_tiny(kind)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    torso = ['input_blocks', 'middle_block'] + (['output_blocks'] if kind != 'classifier' else [])
    convs = {f'{n}.{p}' for n, m in net.named_modules()
             if n.split('.')[0] in torso and isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d))
             for p, _ in m.named_parameters(recurse=False)}
    assert convs and any(k.startswith('middle_block.1.qkv') for k in convs)

    net.convert_to_fp16()
    assert net.dtype == torch.float16
    for key, value in net.state_dict().items():
        assert value.dtype == (torch.float16 if key in convs else torch.float32), key
    # Linear layers, norms, embeddings and the output head are untouched.
    assert net.time_embed[0].weight.dtype == torch.float32
    assert net.middle_block[0].emb_layers[1].weight.dtype == torch.float32
    assert net.middle_block[0].in_layers[0].weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in net.out.parameters())

    net.convert_to_fp32()
    assert net.dtype == torch.float32
    for key, value in net.state_dict().items():
        assert value.dtype == torch.float32, key
        expected = before[key].half().float() if key in convs else before[key]
        assert torch.equal(value, expected), key


@pytest.mark.parametrize('kind', ['adm', 'cm', 'classifier'])
def test_tiny_fp16_forward_if_supported(kind):
    """Optional: the float16 torso on the CPU (skipped where CPU half convolutions are not
    supported). The output keeps the input dtype and stays close to the float32 one."""
    net = make_tiny(kind)
    x, t, y = tiny_inputs(kind)
    with torch.no_grad():
        ref = run(net, kind, x, t, y)
        net.convert_to_fp16()
        features = []
        net.middle_block.register_forward_hook(lambda m, i, o: features.append(o))
        try:
            out = run(net, kind, x, t, y)
        except RuntimeError as error:  # e.g. "not implemented for 'Half'"
            pytest.skip(f'float16 on this CPU build: {error}')
    assert out.dtype == torch.float32 and features[0].dtype == torch.float16
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max() + 1e-3


@pytest.mark.parametrize('kind', ['adm', 'cm', 'classifier'])
def test_tiny_state_dict_round_trip(kind, tmp_path):
    net = make_tiny(kind, seed=3)
    path = tmp_path / 'net.pt'
    torch.save(net.state_dict(), path)

    fresh = make_tiny(kind, seed=4)  # different weights before loading
    x, t, y = tiny_inputs(kind)
    with torch.no_grad():
        assert not torch.equal(run(fresh, kind, x, t, y), run(net, kind, x, t, y))
    result = fresh.load_state_dict(torch.load(path, weights_only=True), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    with torch.no_grad():
        assert torch.equal(run(fresh, kind, x, t, y), run(net, kind, x, t, y))


def test_tiny_classifier_adaptive_pool():
    config = dict(TINY_CLASSIFIER, classifier_pool='adaptive')
    net = randomize_(na.create_adm_classifier(config, num_classes=NUM_CLASSES)).eval()
    x, t, _ = tiny_inputs('classifier')
    with torch.no_grad():
        out = net(x, t)
    assert out.shape == (2, NUM_CLASSES) and torch.isfinite(out).all()


def test_dropout_is_active_in_train_mode_only():
    net = make_tiny('cm')  # dropout 0.1
    x, t, _ = tiny_inputs('cm')
    with torch.no_grad():
        net.train()
        torch.manual_seed(0)
        a = net(x, t)
        torch.manual_seed(1)
        b = net(x, t)
        net.eval()
        c = net(x, t)
        d = net(x, t)
    assert not torch.equal(a, b) and torch.equal(c, d)


# ---------------------------------------------------------------------------------------------
# Attention math.


def reference_attention(q, k, v):
    """(B, H, T, D) softmax attention via torch's fused reference implementation."""
    return F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize('order', ['legacy', 'new', 'cm'])
def test_qkv_attention_orders_against_reference(order):
    """Each module reads its packed channel order correctly and computes softmax attention
    with scale 1/sqrt(head_dim)."""
    gen = torch.Generator().manual_seed(0)
    batch, heads, dim, length = 2, 3, 8, 10
    q, k, v = (torch.randn(batch, heads, length, dim, generator=gen, dtype=torch.float64)
               for _ in range(3))
    expected = reference_attention(q, k, v)  # (B, H, T, D)
    expected = expected.permute(0, 1, 3, 2).reshape(batch, heads * dim, length)

    as_channels = [t.permute(0, 1, 3, 2) for t in (q, k, v)]  # (B, H, D, T)
    if order == 'legacy':  # channels (head, q/k/v, dim)
        packed = torch.stack(as_channels, dim=2).reshape(batch, -1, length)
        module = na.QKVAttentionLegacy(heads)
    else:  # channels (q/k/v, head, dim)
        packed = torch.stack(as_channels, dim=1).reshape(batch, -1, length)
        module = na.QKVAttention(heads) if order == 'new' else \
            na.QKVFlashAttention(heads * dim, heads)
    torch.testing.assert_close(module(packed), expected)


def test_attention_block_cm_equals_legacy_with_permuted_weights():
    """The CM attention block (Conv2d, q/k/v-outermost) and the guided-diffusion block
    (Conv1d, head-outermost) compute the same function once the weights are re-laid out."""
    channels, heads = 64, 4
    dim = channels // heads
    legacy = randomize_(na.AttentionBlock(channels, num_head_channels=dim))
    cm = na.AttentionBlock(channels, num_head_channels=dim, attention_type='cm')
    assert isinstance(cm.attention, na.QKVFlashAttention) and isinstance(cm.qkv, torch.nn.Conv2d)
    # Output channel c of the legacy qkv is (head, which, d); the CM one is (which, head, d).
    perm = torch.arange(3 * channels).reshape(heads, 3, dim).permute(1, 0, 2).reshape(-1)
    with torch.no_grad():
        cm.norm.load_state_dict(legacy.norm.state_dict())
        cm.qkv.weight.copy_(legacy.qkv.weight[perm][..., None])
        cm.qkv.bias.copy_(legacy.qkv.bias[perm])
        cm.proj_out.weight.copy_(legacy.proj_out.weight[..., None])
        cm.proj_out.bias.copy_(legacy.proj_out.bias)
        x = torch.randn(2, channels, 6, 5, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(cm(x), legacy(x), atol=1e-5, rtol=1e-5)

    new = na.AttentionBlock(channels, num_head_channels=dim, use_new_attention_order=True)
    assert isinstance(new.attention, na.QKVAttention)
    new.load_state_dict({k: v.reshape(new.state_dict()[k].shape)
                         for k, v in cm.state_dict().items()})
    with torch.no_grad():
        torch.testing.assert_close(new(x), legacy(x), atol=1e-5, rtol=1e-5)


def test_attention_pool_returns_mean_token():
    pool = randomize_(na.AttentionPool2d(4, 32, 16, 7))
    x = torch.randn(3, 32, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = pool(x)
        # By hand: prepend the mean token, add positions, attend, project, take token 0.
        tokens = torch.cat([x.flatten(2).mean(-1, keepdim=True), x.flatten(2)], -1)
        tokens = tokens + pool.positional_embedding[None]
        qkv = pool.qkv_proj(tokens)
        q, k, v = (t.reshape(3, 2, 16, -1).transpose(-1, -2) for t in qkv.chunk(3, dim=1))
        attended = reference_attention(q, k, v).transpose(-1, -2).reshape(3, 32, -1)
        expected = pool.c_proj(attended)[:, :, 0]
    assert out.shape == (3, 7)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Helpers and factories.


def test_timestep_embedding_formula():
    t = torch.tensor([0.0, 1.5, 999.0])
    emb = na.timestep_embedding(t, 8)
    freqs = torch.tensor([math.exp(-math.log(10000) * i / 4) for i in range(4)])
    expected = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], -1)
    torch.testing.assert_close(emb, expected)
    odd = na.timestep_embedding(t, 9)
    assert odd.shape == (3, 9) and torch.equal(odd[:, -1], torch.zeros(3))


def test_group_norm32_computes_in_float32():
    norm = na.GroupNorm32(32, 64)
    x = torch.randn(2, 64, 4, 4).half()
    out = norm(x)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), norm(x.float()), atol=2e-3, rtol=0)


def test_config_parsing():
    assert na.default_channel_mult(256) == (1, 1, 2, 2, 4, 4)
    assert na.default_channel_mult(64) == (1, 2, 3, 4)
    with pytest.raises(ValueError):
        na.default_channel_mult(48)
    assert na.parse_channel_mult('', 128) == (1, 1, 2, 3, 4)
    assert na.parse_channel_mult('1,2,2', 32) == (1, 2, 2)
    assert na.parse_attention_resolutions('32,16,8', 256) == (8, 16, 32)
    assert na.parse_attention_resolutions([16, 8], 32) == (2, 4)
    with pytest.raises(ValueError):
        na.create_adm_unet(dict(TINY_UNET, num_chanels=64))  # a typo is not ignored
    # Diffusion options of the official scripts are accepted and ignored.
    net = na.create_adm_unet(dict(TINY_UNET, diffusion_steps=1000, noise_schedule='linear'))
    assert net.out_channels == 6 and net.num_classes == 1000
    assert net.attention_resolutions == (2, 4)


def test_module_runs_standalone():
    """The module only needs torch: it can be executed from its file alone."""
    namespace = runpy.run_path(na.__file__)
    assert 'UNetModel' in namespace and 'create_cm_unet' in namespace
