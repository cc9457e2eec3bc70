"""The AMED predictor network (predictors/networks.py) and its snapshot format (predictors/snapshot.py)."""

import json
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch

import solvers
from predictors.networks import AMEDPredictor, PositionalEmbedding
from predictors.snapshot import load_snapshot, save_snapshot

HEADS = [(0.0, 0.0), (0.01, 0.0), (0.0, 0.02), (0.01, 0.02)]


def make(scale_dir=0.01, scale_time=0.0, seed=0, **kw):
    torch.manual_seed(seed)
    return AMEDPredictor(scale_dir=scale_dir, scale_time=scale_time, **kw)


def randomise(p, seed=1):
    """Non-zero biases and larger weights, so that every output depends on every parameter
    (scaled by 1/sqrt(fan_in) so that the sigmoids stay away from saturation)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, v in p.named_parameters():
            fan_in = v.shape[1] if v.ndim == 2 else 1
            v.copy_(torch.randn(v.shape, generator=g) * (1.5 / np.sqrt(fan_in) if v.ndim == 2 else 0.3))
    return p


def features(b, seed=0):
    return torch.randn(b, 8, 8, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# Architecture.

@pytest.mark.parametrize('scale_dir, scale_time, count', [
    (0.0, 0.0, 8929), (0.01, 0.0, 8950), (0.0, 0.1, 8950), (0.01, 0.1, 8971)])
def test_parameter_count(scale_dir, scale_time, count):
    assert sum(v.numel() for v in make(scale_dir, scale_time).parameters()) == count


@pytest.mark.parametrize('scale_dir, scale_time', HEADS)
def test_state_dict_keys_and_shapes(scale_dir, scale_time):
    expected = {
        'map_layer0.weight': (8, 8), 'map_layer0.bias': (8,),
        'enc_layer0.weight': (128, 64), 'enc_layer0.bias': (128,),
        'enc_layer1.weight': (4, 128), 'enc_layer1.bias': (4,),
        'fc_r.weight': (1, 20), 'fc_r.bias': (1,),
    }
    if scale_dir > 0:
        expected.update({'fc_scale_dir.weight': (1, 20), 'fc_scale_dir.bias': (1,)})
    if scale_time > 0:
        expected.update({'fc_scale_time.weight': (1, 20), 'fc_scale_time.bias': (1,)})
    sd = make(scale_dir, scale_time).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert all(v.dtype == torch.float32 for v in sd.values())


def test_official_state_dict_loads_strict():
    """A state dict with the official names and shapes (as from the official class) loads strictly."""
    src = randomise(make(0.01, 0.02))
    official = {k: v.clone() for k, v in src.state_dict().items()}
    dst = make(0.01, 0.02, seed=5)
    dst.load_state_dict(official, strict=True)
    f = features(3)
    for a, b in zip(src(f, 5.0, 2.0), dst(f, 5.0, 2.0)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(RuntimeError):
        make(0.0, 0.0).load_state_dict(official, strict=True)


def test_initialisation():
    p = make(0.01, 0.02, seed=3)
    for name, layer in p.named_children():
        if name == 'map_noise':
            continue
        assert torch.count_nonzero(layer.bias) == 0, name
        fan_out, fan_in = layer.weight.shape
        if name == 'map_layer0':   # xavier_uniform
            assert layer.weight.abs().max() <= np.sqrt(6 / (fan_in + fan_out))
        elif fan_in * fan_out >= 4096:   # kaiming_normal: std sqrt(1/fan_in), statistically
            assert abs(layer.weight.std().item() / np.sqrt(1 / fan_in) - 1) < 0.05, name
    assert not list(p.map_noise.parameters())
    # Deterministic given the seed; different for another seed.
    q = make(0.01, 0.02, seed=3)
    for (k, a), b in zip(p.state_dict().items(), q.state_dict().values()):
        assert torch.equal(a, b), k
    assert not torch.equal(p.enc_layer0.weight, make(0.01, 0.02, seed=4).enc_layer0.weight)


def test_positional_embedding_matches_numpy():
    sigmas = np.array([0.002, 0.1, 1.0, 7.5, 80.0], dtype=np.float64)
    freqs = (1 / 10000) ** (np.arange(4) / 3)          # endpoint=True: divide by half - 1
    arg = sigmas[:, None] * freqs[None, :]
    ref = np.concatenate([np.sin(arg), np.cos(arg)], axis=1)   # [cos, sin] with halves swapped
    emb = PositionalEmbedding(8, max_positions=10000, endpoint=True)(torch.tensor(sigmas, dtype=torch.float32))
    assert emb.shape == (5, 8) and emb.dtype == torch.float32
    np.testing.assert_allclose(emb.numpy(), ref, rtol=0, atol=2e-6)
    # The module inside the predictor is the same embedding of raw sigma.
    np.testing.assert_allclose(make().map_noise(torch.tensor([80.0])).numpy(), ref[-1:], atol=2e-6)


def test_time_embedding_in_forward():
    """out = [bottleneck, silu(map_layer0(PE(t_cur))), silu(map_layer0(PE(t_next)))], recomputed by hand."""
    p = randomise(make(0.01, 0.02))
    f = features(2)
    t_cur, t_next = 14.0, 3.0

    def pe(t):
        fr = (1 / 10000) ** (np.arange(4) / 3)
        return torch.tensor(np.concatenate([np.sin(t * fr), np.cos(t * fr)]), dtype=torch.float32)

    def lin(layer, x):
        return x @ layer.weight.t() + layer.bias

    with torch.no_grad():
        emb = torch.cat([torch.nn.functional.silu(lin(p.map_layer0, pe(t))) for t in (t_cur, t_next)])
        h = lin(p.enc_layer1, torch.nn.functional.silu(lin(p.enc_layer0, f.reshape(2, 64))))
        out = torch.cat([h, emb.expand(2, 16)], dim=1)
        r = torch.sigmoid(lin(p.fc_r, out))[:, 0]
        c = torch.sigmoid(lin(p.fc_scale_dir, out))[:, 0] * 0.02 + 0.99
        a = torch.sigmoid(lin(p.fc_scale_time, out))[:, 0] * 0.04 + 0.98
        got = p(f, t_cur, t_next)
    for x, y in zip(got, (r, c, a)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Outputs.

@pytest.mark.parametrize('scale_dir, scale_time', HEADS)
@pytest.mark.parametrize('b', [1, 2, 3, 5])
def test_outputs_ranges_and_shapes(scale_dir, scale_time, b):
    p = randomise(make(scale_dir, scale_time))
    out = p(features(b), 80.0, 10.0)
    assert isinstance(out, tuple) and len(out) == 3
    r, c, a = out
    for v in out:
        assert v.shape == (b,) and v.dtype == torch.float32
    assert torch.all((r > 0) & (r < 1))
    for v, s in ((c, scale_dir), (a, scale_time)):
        if s > 0:
            assert torch.all((v > 1 - s) & (v < 1 + s))
        else:
            assert torch.equal(v, torch.ones(b))


@pytest.mark.parametrize('scale_dir, scale_time', HEADS)
def test_batch_independence(scale_dir, scale_time):
    p = randomise(make(scale_dir, scale_time))
    f = features(5)
    with torch.no_grad():
        full = p(f, 2.5, 0.8)
        for i in range(5):
            single = p(f[i:i + 1], 2.5, 0.8)
            for x, y in zip(full, single):
                torch.testing.assert_close(x[i:i + 1], y, rtol=0, atol=1e-6)
        for b in (2, 3):
            for x, y in zip(full, p(f[:b], 2.5, 0.8)):
                torch.testing.assert_close(x[:b], y, rtol=0, atol=1e-6)


def test_time_arguments():
    """Scalars as python floats, 0-dim or 1-element tensors give the same result; t matters."""
    p = randomise(make(0.01, 0.02))
    f = features(3)
    with torch.no_grad():
        ref = p(f, 80.0, 10.0)
        for tc, tn in ((torch.tensor(80.0), torch.tensor(10.0)), (torch.tensor([80.0]), torch.tensor([10.0])),
                       (torch.tensor(80.0, dtype=torch.float64), 10)):
            for x, y in zip(ref, p(f, tc, tn)):
                torch.testing.assert_close(x, y, rtol=0, atol=0)
        assert not torch.allclose(ref[0], p(f, 10.0, 80.0)[0])   # cur and next are not symmetric
        with pytest.raises(ValueError, match='scalar'):
            p(f, torch.tensor([80.0, 70.0, 60.0]), 10.0)
        with pytest.raises(ValueError, match='bottleneck_input_dim'):
            p(torch.zeros(3, 4, 4), 80.0, 10.0)
        assert p(f, 80.0, 10.0, class_labels=torch.zeros(3, 10))[0].shape == (3,)


def test_half_precision_feature():
    """Layers run in the feature's dtype (as the official Linear); outputs are float32 and close."""
    p = randomise(make(0.01, 0.02))
    f = features(4)
    with torch.no_grad():
        ref = p(f, 5.0, 1.0)
        got = p(f.half(), 5.0, 1.0)
    for x, y in zip(ref, got):
        assert y.dtype == torch.float32
        torch.testing.assert_close(x, y, rtol=0, atol=5e-3)


def test_solver_call_signature():
    """The call the AMED plugin makes: predictor(feature (B,8,8), t_cur, t_next) with python floats."""
    p = make(0.01, 0.02)
    assert AMEDPredictor.needs_feature is True and p.needs_feature
    x = torch.zeros(4, 3, 8, 8)
    r, c, a = solvers._predict(p, features(4), 80.0, 10.0, x)
    for v in (r, c, a):
        assert v.shape == (4, 1, 1, 1)
    assert torch.all((r > 0) & (r < 1))
    fixed = solvers.FixedPredictor()(features(4), 80.0, 10.0)
    assert [tuple(v.shape) for v in p(features(4), 80.0, 10.0)] == [tuple(v.shape) for v in fixed]


def test_gradients_reach_all_parameters():
    p = randomise(make(0.01, 0.02))
    r, c, a = p(features(3), 3.0, 1.0)
    (r.square().sum() + c.sum() + a.sum()).backward()
    for name, v in p.named_parameters():
        assert v.grad is not None and torch.isfinite(v.grad).all() and v.grad.abs().sum() > 0, name


def test_constructor_validation_and_config():
    for name in ('scale_dir', 'scale_time'):
        for bad in (-0.1, float('nan'), 'x', None):
            with pytest.raises(ValueError, match=name):
                AMEDPredictor(**{name: bad})
    with pytest.raises(ValueError, match='noise_channels'):
        AMEDPredictor(noise_channels=7)
    with pytest.raises(ValueError, match='hidden_dim'):
        AMEDPredictor(hidden_dim=0)
    p = make(0.02, 0.1, hidden_dim=32)
    cfg = p.config()
    assert cfg == dict(scale_dir=0.02, scale_time=0.1, hidden_dim=32, bottleneck_input_dim=64,
                       bottleneck_output_dim=4, noise_channels=8)
    assert json.loads(json.dumps(cfg)) == cfg
    q = AMEDPredictor(**cfg)
    assert {k: v.shape for k, v in q.state_dict().items()} == {k: v.shape for k, v in p.state_dict().items()}
    assert AMEDPredictor().config()['scale_dir'] == 0.01 and AMEDPredictor().config()['scale_time'] == 0.0


# ----------------------------------------------------------------------------------------------
# Snapshots.

SETTINGS = dict(solver='ipndm', num_steps=4, schedule='time_uniform', afs=True, max_order=4,
                sigma_min=0.002, sigma_max=80.0, predict_x0=None, teacher=['heun', 10])


def test_snapshot_round_trip(tmp_path):
    p = randomise(make(0.01, 0.02))
    path = tmp_path / 'network-snapshot-000005.pt'
    save_snapshot(path, p, SETTINGS)
    assert sorted(os.listdir(tmp_path)) == ['network-snapshot-000005.pt']   # no temp files left
    raw = torch.load(path, map_location='cpu', weights_only=True)           # plain data only
    assert raw['format'] == 'amed-predictor' and raw['version'] == 1
    assert raw['predictor_config'] == p.config() and raw['settings'] == SETTINGS

    g = torch.get_rng_state()
    q, settings = load_snapshot(str(path))
    assert torch.equal(torch.get_rng_state(), g)    # loading leaves the global RNG alone
    assert settings == SETTINGS and q.config() == p.config()
    assert isinstance(q, AMEDPredictor) and not q.training
    assert not any(v.requires_grad for v in q.parameters())
    f = features(5)
    with torch.no_grad():
        for x, y in zip(p(f, 7.0, 3.0), q(f, 7.0, 3.0)):
            assert torch.equal(x, y)

    # Overwriting an existing snapshot works and is also atomic.
    save_snapshot(path, make(0.0, 0.0), {'solver': 'euler'})
    q, settings = load_snapshot(path)
    assert settings == {'solver': 'euler'} and q.config()['scale_dir'] == 0.0
    assert os.listdir(tmp_path) == ['network-snapshot-000005.pt']


def test_snapshot_of_ddp_like_wrapper(tmp_path):
    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module
    p = make()
    save_snapshot(tmp_path / 's.pt', Wrapper(p), {})
    q, _ = load_snapshot(tmp_path / 's.pt')
    assert q.state_dict().keys() == p.state_dict().keys()


def test_snapshot_bad_settings_leave_nothing(tmp_path):
    path = tmp_path / 's.pt'
    for bad in ({'x': object()}, {'x': float('nan')}, ['not', 'a', 'dict']):
        with pytest.raises(ValueError, match='settings'):
            save_snapshot(path, make(), bad)
    assert os.listdir(tmp_path) == []


def test_snapshot_write_error_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / 's.pt'
    save_snapshot(path, make(), {'solver': 'amed'})
    before = path.read_bytes()

    def failing_save(obj, f, *args, **kwargs):
        f.write(b'partial')
        raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', failing_save)
    with pytest.raises(OSError, match='disk full'):
        save_snapshot(path, make(0.0, 0.0), {'solver': 'euler'})
    assert os.listdir(tmp_path) == ['s.pt'] and path.read_bytes() == before


def test_snapshot_load_errors(tmp_path):
    missing = tmp_path / 'missing.pt'
    with pytest.raises(FileNotFoundError, match='missing.pt'):
        load_snapshot(missing)

    def expect_not_snapshot(path, match='not an AMED predictor snapshot'):
        with pytest.raises(ValueError, match=match) as info:
            load_snapshot(path)
        msg = str(info.value)
        assert str(path) in msg and '\n' not in msg
        return msg

    text = tmp_path / 'notes.txt'
    text.write_text('hello\n')
    expect_not_snapshot(text)

    plain = tmp_path / 'plain.pkl'
    with open(plain, 'wb') as f:
        pickle.dump({'model': 1, 'loss_fn': 2}, f)
    assert 'NVIDIA-pickle' in expect_not_snapshot(plain)

    code = tmp_path / 'code.pkl'
    with open(code, 'wb') as f:
        pickle.dump({'model': zipfile.ZipInfo('x')}, f)    # a GLOBAL that weights_only refuses
    assert 'NVIDIA-pickle' in expect_not_snapshot(code)

    other_zip = tmp_path / 'other.zip'
    with zipfile.ZipFile(other_zip, 'w') as z:
        z.writestr('a.txt', 'b')
    expect_not_snapshot(other_zip)

    other_torch = tmp_path / 'weights.pt'
    torch.save(make().state_dict(), other_torch)       # a torch file, but not ours
    expect_not_snapshot(other_torch)

    empty = tmp_path / 'empty.pt'
    empty.write_bytes(b'')
    expect_not_snapshot(empty)

    expect_not_snapshot(tmp_path)   # a directory

    future = tmp_path / 'future.pt'
    torch.save({'format': 'amed-predictor', 'version': 2}, future)
    expect_not_snapshot(future, match='version')

    mismatch = tmp_path / 'mismatch.pt'
    save_snapshot(mismatch, make(0.01, 0.0), {})
    data = torch.load(mismatch, weights_only=True)
    data['predictor_config']['scale_time'] = 0.1     # config says a head exists that the weights lack
    torch.save(data, mismatch)
    expect_not_snapshot(mismatch, match='state_dict')
