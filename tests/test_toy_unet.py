"""The built-in learned model toy_unet: the shipped checkpoint (hash, size, code-free), loading
through the EDM adapter, its U-Net feature hook, pinned outputs, the convergence of its reference
ODE solution, a deterministic training script, and the scripts working on it."""

import json
import os
import shutil

import pytest
import torch
from click.testing import CliRunner

import sample
import train
from models import networks_edm, toy_unet
from models.edm import EDMDenoiser
from models.presets import load_model
from models.toy import GaussianMixture

pytestmark = pytest.mark.usefixtures('single_thread')   # small batches; robust on a busy 2-core machine


@pytest.fixture(scope='module')
def model():
    return load_model('toy_unet')


def test_checkpoint_is_small_code_free_and_matches_its_sidecar():
    assert os.path.getsize(toy_unet.WEIGHTS) <= 8 * 2 ** 20
    with open(toy_unet.sidecar_path(toy_unet.WEIGHTS)) as f:
        meta = json.load(f)
    assert toy_unet.sha256_file(toy_unet.WEIGHTS) == meta['sha256']
    assert meta['config'] == toy_unet.CONFIG and meta['feature_block'] == toy_unet.FEATURE_BLOCK
    assert meta['command'].startswith('python -m models.toy_unet') and meta['revision'] != 'unknown'
    state = torch.load(toy_unet.WEIGHTS, map_location='cpu', weights_only=True)   # no code in the file
    assert all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 for v in state.values())
    assert all(torch.isfinite(v).all() for v in state.values())


def test_loads_through_the_edm_adapter_with_a_unet_feature(model):
    assert isinstance(model, EDMDenoiser) and model.dataset_name == 'toy_unet'
    assert isinstance(model.net, networks_edm.EDMPrecond) and isinstance(model.net.model, networks_edm.SongUNet)
    assert model.feature_module is model.net.model.enc[toy_unet.FEATURE_BLOCK]
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2
    raw = {}
    handle = model.feature_module.register_forward_hook(lambda m, i, o: raw.setdefault('out', o))
    try:
        with model.capture_feature() as holder:
            model(x, torch.full((3,), 2.0))
    finally:
        handle.remove()
    assert raw['out'].shape == (3, 32, 8, 8)   # a 32-channel U-Net activation at 8x8
    assert holder['feature'].shape == (3, 8, 8)
    torch.testing.assert_close(holder['feature'], raw['out'].mean(1))
    assert (holder['feature'][0] - holder['feature'][1]).abs().max() > 1e-3   # depends on the input


#: D(x; sigma) of the shipped checkpoint at a fixed input (seed 0, x = x0 + sigma n from the mixture):
#: the sum and the first three pixels, per sigma. Whoever changes the network code must keep these.
PINNED = {0.05: [-218.497437, -0.293205, -0.475079, -0.125063],
          0.5: [-208.210358, -0.208119, -0.244239, -0.159207],
          5.0: [56.949608, 0.046392, 0.059262, 0.067642]}


def _pinned_inputs():
    g = torch.Generator().manual_seed(0)
    x0 = GaussianMixture().sample(2, generator=g).float()
    n = torch.randn(x0.shape, generator=g)
    return x0, n


def test_pinned_outputs(model):
    x0, n = _pinned_inputs()
    got = {}
    with torch.no_grad():
        for sigma in (0.05, 0.5, 5.0):
            d = model(x0 + sigma * n, torch.full((2,), sigma))
            got[sigma] = [d.sum().item(), *d.flatten()[:3].tolist()]
    for sigma, values in PINNED.items():
        assert got[sigma] == pytest.approx(values, rel=1e-4, abs=1e-4), (sigma, got[sigma])


def test_denoiser_is_close_to_the_exact_one(model):
    """A learned model, not noise: at sigma 0.5 its error to the exact denoiser is a fraction of the
    exact denoiser's own distance from the clean data."""
    x0, n = _pinned_inputs()
    exact = GaussianMixture()
    x = x0 + 0.5 * n
    sigma = torch.full((2,), 0.5)
    d_net, d_exact = model(x, sigma).double(), exact(x.double(), sigma.double())
    assert (d_net - d_exact).norm() < 0.5 * (d_exact - x0.double()).norm()


def test_reference_solution_converges(model):
    """Doubling the reference's RK4 steps changes the final state by under 1e-4 relative (here on 2
    samples, from sigma 80 to 0.002), while halving them changes it by more (the check measures)."""
    latents = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    steps = toy_unet.REFERENCE_STEPS_PER_UNIT
    ref, fine, coarse = (model.ode_solution_from_noise(latents, 80.0, [0.002], steps_per_unit=s)[-1]
                         for s in (steps, 2 * steps, steps // 2))
    rel = lambda a, b: ((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).max().item()  # noqa: E731
    assert rel(ref, fine) < 1e-4, rel(ref, fine)
    assert rel(coarse, fine) > 4 * rel(ref, fine), (rel(coarse, fine), rel(ref, fine))


def test_training_script_is_deterministic_and_loadable(tmp_path):
    a, b = tmp_path / 'a' / 'net.pt', tmp_path / 'b' / 'net.pt'
    for path in (a, b):
        toy_unet.train(str(path), kimg=0.128, progress=False, command='test')
    assert a.read_bytes() == b.read_bytes()
    meta = json.loads((tmp_path / 'a' / 'net.json').read_text())
    assert meta['sha256'] == toy_unet.sha256_file(a) and meta['recipe']['kimg'] == 0.128
    assert isinstance(load_model('toy_unet', model_path=str(a)), toy_unet.ToyUNetDenoiser)


def test_damaged_checkpoint_gives_one_line(tmp_path):
    path = tmp_path / 'net.pt'
    shutil.copy(toy_unet.WEIGHTS, path)
    with pytest.raises(ValueError, match='net.json is missing'):
        toy_unet.load(str(path))
    shutil.copy(toy_unet.sidecar_path(toy_unet.WEIGHTS), tmp_path / 'net.json')
    with open(path, 'r+b') as f:
        f.seek(200)
        f.write(b'\0\0\0\0')
    with pytest.raises(ValueError, match='has sha256 .* its sidecar'):
        toy_unet.load(str(path))


def test_sample_and_train_run_on_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(sample.main, ['--dataset_name=toy_unet', '--solver=ipndm', '--num_steps=6',
                                              '--seeds=0-63', '--grid', '--no-progress', '--outdir=grid'])
    assert result.exit_code == 0, result.output
    assert os.path.isfile('grid/grid.png')
    result = CliRunner().invoke(train.main, ['--dataset_name=toy_unet', '--batch=4', '--total_kimg=0.008',
                                             '--num_steps=3', '--no-progress', '--outdir=exps'])
    assert result.exit_code == 0, result.output
    assert len(os.listdir('exps')) == 1


def test_quickstart_prints_the_table_against_the_reference(tmp_path, monkeypatch):
    from evaluation import quickstart
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(quickstart.main, ['--dataset_name=toy_unet', '--kimg=0.008', '--batch=4', '--num=2',
                                                  '--outdir=exps'])
    assert result.exit_code == 0, result.output
    assert 'RMS error to reference ODE solution (toy_unet, 2 samples) | NFE 5 |' in result.output
    rows = [line for line in result.output.splitlines() if line.startswith('| ') and 'NFE' not in line]
    assert len(rows) == 8 and os.path.isfile('samples/quickstart-toy_unet/grid.png')
