"""EDM checkpoints and published AMED predictors, in their real file formats, through the real
loading paths: tiny networks built with our code, pickled as EDM's training loop and the official
AMED code store them, loaded in fresh processes."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import sample
from models.networks_edm import build_from_config
from tests.legacy.edm_loss import VPLoss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_SONG = dict(img_resolution=16, img_channels=3, label_dim=0, model_type='SongUNet', precond='VPPrecond',
                 model_channels=16, channel_mult=[1, 2], num_blocks=4, attn_resolutions=[8], dropout=0.0,
                 augment_dim=9)
TINY_ADM = dict(img_resolution=16, img_channels=3, label_dim=10, model_type='DhariwalUNet', precond='EDMPrecond',
                model_channels=32, channel_mult=[1, 2], num_blocks=3, attn_resolutions=[], dropout=0.0)


def make_edm_pickle(path, config, seed=0):
    torch.manual_seed(seed)
    net = build_from_config(config, device='cpu').eval().requires_grad_(False)
    data = dict(ema=net, loss_fn=VPLoss(), augment_pipe=None,
                dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path='x.zip'))
    with open(path, 'wb') as f:
        pickle.dump(data, f)
    return net


def pickle_globals(path):
    """The (module, name) GLOBALs a pickle resolves while loading."""
    seen = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            seen.add((module, name))
            return super().find_class(module, name)

    with open(path, 'rb') as f:
        Recorder(f).load()
    return seen


def run_fresh(code, tmp_path):
    """Run python code in a fresh interpreter (repo root importable) and return its JSON output."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1')
    result = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize('config', [TINY_SONG, TINY_ADM], ids=['songunet-vp', 'adm-edm'])
def test_edm_pickle_loads_in_fresh_process_and_samples(tmp_path, config):
    path = tmp_path / 'net.pkl'
    net = make_edm_pickle(path, config)
    ops = pickle_globals(path)
    assert ('torch_utils.persistence', '_reconstruct_persistent_obj') in ops
    assert not any(mod.startswith('models') for mod, _ in ops)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 16, 16, generator=g) * 5
    sigma = torch.tensor([5.0, 1.0, 0.3])
    labels = torch.eye(10)[[1, 4, 7]] if config['label_dim'] else None
    torch.save(dict(x=x, sigma=sigma, labels=labels, expected=net(x, sigma, labels)), tmp_path / 'io.pt')
    code = f"""
import json, sys, torch
from models.edm import EDMDenoiser, load_edm_pickle
import solvers
from solvers import FixedPredictor
from predictors.networks import AMEDPredictor
assert 'models.networks_edm' not in sys.modules
net = load_edm_pickle('net.pkl')
assert 'models.networks_edm' not in sys.modules, 'our network classes were imported'
io = torch.load('io.pt')
model = EDMDenoiser(net)
diff = (model(io['x'], io['sigma'], io['labels']) - io['expected']).abs().max().item()
torch.manual_seed(0)
pred = AMEDPredictor(scale_dir=0.01, scale_time=0.2)
z = torch.randn(2, 3, 16, 16)
cond = torch.eye(10)[[0, 3]] if model.label_dim else None
finite = {{}}
for name, opts in [('amed', {{}}), ('euler', {{}}), ('ipndm', dict(max_order=4)), ('dpm', {{}}), ('dpmpp', dict(max_order=3))]:
    for p in ([pred] if name == 'amed' else [None, pred]):
        out = solvers.sample(model, z, cond, solver=name, num_steps=4, afs=True, predictor=p, **opts)
        finite[name + ('+amed' if p is not None else '')] = bool(torch.isfinite(out).all())
print(json.dumps(dict(diff=diff, module=type(net).__module__, finite=finite)))
"""
    out = run_fresh(code, tmp_path)
    assert out['diff'] == 0.0
    assert out['module'].startswith('_imported_module_')
    assert len(out['finite']) == 9 and all(out['finite'].values())


def make_published_predictor(folder, legacy=False, scale_dir=0.01, scale_time=0.0, sampler='ipndm', seed=0):
    """A predictor pickle in the published layout, made with an official-style class."""
    from tests.legacy import official_networks
    from predictors.legacy import legacy_modules
    official_networks.LEGACY = legacy
    torch.manual_seed(seed)
    with legacy_modules():
        from tests.legacy.official_loss import AMED_loss
        net = official_networks.AMED_predictor(
            dataset_name='cifar10', img_resolution=16, num_steps=4, sampler_stu=sampler, sampler_tea=sampler, M=2,
            guidance_type=None, guidance_rate=0.0, schedule_type='polynomial', schedule_rho=7.0, afs=True,
            scale_dir=scale_dir, scale_time=scale_time if not legacy else bool(scale_time), max_order=4 if sampler == 'ipndm' else 3,
            predict_x0=True, lower_order_final=True)
        for p in net.parameters():   # make the heads matter
            p.data.normal_(0, 0.5)
        net = net.eval().requires_grad_(False)
        loss = AMED_loss(num_steps=4, sampler_stu=sampler, sampler_tea=sampler, M=2, afs=True, max_order=3)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, 'network-snapshot-000010.pkl')
        with open(path, 'wb') as f:
            pickle.dump(dict(model=net, loss_fn=loss), f)
    official_networks.LEGACY = False
    return path, net


@pytest.mark.parametrize('legacy,scale_dir,scale_time', [(False, 0.0, 0.0), (False, 0.01, 0.0), (False, 0.0, 0.2),
                                                         (False, 0.01, 0.2), (True, 0.01, 0.0), (True, 0.01, 0.2)])
def test_legacy_predictor_outputs(tmp_path, legacy, scale_dir, scale_time):
    """Both output conventions, any batch size (no [*output] split), loaded without the class."""
    path, net = make_published_predictor(tmp_path / 'run', legacy, scale_dir, scale_time)
    feats = torch.randn(3, 8, 8)
    raw = net(feats, torch.tensor([9.7]), torch.tensor([0.47]))
    code = f"""
import json, torch
from predictors.legacy import load_published_predictor
pred, settings = load_published_predictor({str(path)!r})
feats = torch.load('feats.pt')
outs = {{b: [v.tolist() for v in pred(feats[:b], 9.7, 0.47)] for b in (1, 2, 3)}}
print(json.dumps(dict(outs=outs, settings=settings)))
"""
    torch.save(feats, tmp_path / 'feats.pt')
    out = run_fresh(code, tmp_path)
    raw = [raw] if isinstance(raw, torch.Tensor) else list(raw)
    r = raw[0].reshape(-1)
    if len(raw) == 3:
        c, a = raw[1].reshape(-1), raw[2].reshape(-1)
    elif len(raw) == 2:
        c, a = (torch.ones(3), raw[1].reshape(-1)) if (scale_time and not legacy) else (raw[1].reshape(-1), torch.ones(3))
    else:
        c, a = torch.ones(3), torch.ones(3)
    for b in (1, 2, 3):
        got = torch.tensor(out['outs'][str(b)])
        assert torch.allclose(got, torch.stack([r, c, a])[:, :b], atol=1e-6), (b, got)
    s = out['settings']
    assert s['solver'] == 'ipndm' and s['num_steps'] == 4 and s['max_order'] == 4 and s['afs'] is True
    assert s['dataset_name'] == 'cifar10' and s['guidance_type'] is None


def published_and_snapshot(folder):
    """In ``folder``: edm.pkl (tiny EDM network), a published-format predictor as experiment 0 in
    ./exp, and the same weights as our snapshot ours.pt. Returns the pickle's path."""
    from predictors.legacy import settings_of
    from predictors.networks import AMEDPredictor
    from predictors.snapshot import save_snapshot
    make_edm_pickle(folder / 'edm.pkl', TINY_SONG)
    pkl, net = make_published_predictor(folder / 'exp' / '00000-cifar10-4-5-ipndm-ipndm-2-poly7.0-afs',
                                        scale_dir=0.01, scale_time=0.2)
    ours = AMEDPredictor(scale_dir=0.01, scale_time=0.2)
    ours.load_state_dict(net.state_dict(), strict=True)
    save_snapshot(str(folder / 'ours.pt'), ours, dict(settings_of(net), img_shape=[3, 16, 16], label_dim=0))
    return pkl


def test_published_predictor_samples_like_our_snapshot(tmp_path, monkeypatch):
    """sample.py with a published-format predictor (by experiment number in ./exp) and an EDM
    pickle as --model_path gives the same images as the same weights in our code-free snapshot."""
    monkeypatch.chdir(tmp_path)
    published_and_snapshot(tmp_path)
    common = ['--model_path=edm.pkl', '--seeds=0-3', '--batch=3', '--no-progress']
    r1 = CliRunner().invoke(sample.main, ['--predictor_path=0', '--outdir=a'] + common, catch_exceptions=False)
    assert r1.exit_code == 0, r1.output
    assert 'executes the code' in r1.stderr
    r2 = CliRunner().invoke(sample.main, ['--predictor_path=ours.pt', '--outdir=b'] + common, catch_exceptions=False)
    assert r2.exit_code == 0, r2.output
    for seed in range(4):
        a = np.asarray(PIL.Image.open(f'a/000000/{seed:06d}.png'))
        b = np.asarray(PIL.Image.open(f'b/000000/{seed:06d}.png'))
        assert a.shape == (16, 16, 3) and np.array_equal(a, b)


def test_edm_preset_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    open('bad.pkl', 'wb').write(b'not a pickle')
    for args, word in [(['--model_path=missing.pkl'], 'missing.pkl'), (['--model_path=bad.pkl'], 'bad.pkl')]:
        r = CliRunner().invoke(sample.main, ['--dataset_name=cifar10', '--solver=euler', '--num_steps=3',
                                             '--outdir=o', '--no-progress'] + args, catch_exceptions=False)
        assert r.exit_code != 0 and word in r.output.strip().splitlines()[-1], r.output
        assert not os.path.exists('o')


def test_train_starts_from_published_predictor(tmp_path, monkeypatch):
    """train.py --predictor_path takes a published predictor (by experiment number in ./exp)."""
    import train
    from predictors.snapshot import load_snapshot
    monkeypatch.chdir(tmp_path)
    make_edm_pickle(tmp_path / 'edm.pkl', TINY_SONG)
    make_published_predictor(tmp_path / 'exp' / '00003-cifar10-4-5-ipndm-ipndm-2-poly7.0-afs', scale_time=0.2)
    args = ['--dataset_name=cifar10', '--model_path=edm.pkl', '--sampler_stu=ipndm', '--sampler_tea=ipndm',
            '--num_steps=4', '--M=2', '--afs=True', '--max_order=4', '--scale_time=0.2', '--batch=4',
            '--total_kimg=0.004', '--no-progress', '--outdir=exps']
    r = CliRunner().invoke(train.main, args + ['--predictor_path=3', '--lr=1e-12'], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    run = os.path.join('exps', os.listdir('exps')[0])
    trained, _ = load_snapshot(os.path.join(run, 'network-snapshot-000000.pt'))
    from predictors.legacy import load_published_predictor
    published, _ = load_published_predictor(os.path.join('exp', os.listdir('exp')[0], 'network-snapshot-000010.pkl'))
    for k, v in published.net.state_dict().items():
        assert torch.allclose(trained.state_dict()[k], v, atol=1e-6), k
    bad = [a if not a.startswith('--num_steps') else '--num_steps=5' for a in args]
    r = CliRunner().invoke(train.main, bad + ['--predictor_path=3'], catch_exceptions=False)
    assert r.exit_code != 0 and 'num_steps' in r.output.strip().splitlines()[-1]
