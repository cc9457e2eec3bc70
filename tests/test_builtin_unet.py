"""The built-in learned models toy_unet and photo_unet: the shipped checkpoints (hash, size,
code-free), loading through the EDM adapter, the U-Net feature hook, pinned outputs, the convergence
of the reference ODE solution, a deterministic training script, and the scripts working on them."""

import json
import os
import shutil

import pytest
import torch
from click.testing import CliRunner

import sample
import train
from models import builtin_unet, networks_edm, photo_unet, toy_unet
from models.builtin_unet import sha256_file, sidecar_path
from models.edm import EDMDenoiser
from models.presets import load_model
from models.toy import GaussianMixture

pytestmark = pytest.mark.usefixtures('single_thread')   # small batches; robust on a busy 2-core machine

SPECS = {'toy_unet': toy_unet.SPEC, 'photo_unet': photo_unet.SPEC}


@pytest.fixture(scope='module', params=list(SPECS))
def spec(request):
    return SPECS[request.param]


@pytest.fixture(scope='module')
def model(spec):
    return load_model(spec.name)


def test_checkpoint_is_small_code_free_and_matches_its_sidecar(spec):
    assert os.path.getsize(spec.weights) <= 8 * 2 ** 20
    with open(sidecar_path(spec.weights)) as f:
        meta = json.load(f)
    assert sha256_file(spec.weights) == meta['sha256']
    assert meta['config'] == spec.config and meta['feature_block'] == spec.feature_block
    assert meta['recipe'] == spec.recipe
    assert meta['command'] == f'{spec.command} --out=models/weights/{spec.name}.pt' and meta['revision'] != 'unknown'
    state = torch.load(spec.weights, map_location='cpu', weights_only=True)   # no code in the file
    assert all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 for v in state.values())
    assert all(torch.isfinite(v).all() for v in state.values())


def test_loads_through_the_edm_adapter_with_a_unet_feature(spec, model):
    assert isinstance(model, EDMDenoiser) and model.dataset_name == spec.name
    assert isinstance(model.net, networks_edm.EDMPrecond) and isinstance(model.net.model, networks_edm.SongUNet)
    assert model.feature_module is model.net.model.enc[spec.feature_block]
    assert model.steps_per_unit == spec.steps_per_unit
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


#: D(x; sigma) of the shipped checkpoints at a fixed input (seed 0, x = x0 + sigma n from the mixture):
#: the sum and the first three pixels, per sigma. Whoever changes the network code must keep these.
PINNED = {'toy_unet': {0.05: [-218.497437, -0.293205, -0.475079, -0.125063],
                       0.5: [-208.210358, -0.208119, -0.244239, -0.159207],
                       5.0: [56.949608, 0.046392, 0.059262, 0.067642]},
          'photo_unet': {0.05: [-232.659607, -0.248173, -0.449452, -0.18805],
                         0.5: [-235.628754, -0.104757, -0.227845, -0.208244],
                         5.0: [-39.875904, 0.118881, 0.161086, 0.154665]}}


def _pinned_inputs():
    g = torch.Generator().manual_seed(0)
    x0 = GaussianMixture().sample(2, generator=g).float()
    n = torch.randn(x0.shape, generator=g)
    return x0, n


def test_pinned_outputs(spec, model):
    x0, n = _pinned_inputs()
    got = {}
    with torch.no_grad():
        for sigma in (0.05, 0.5, 5.0):
            d = model(x0 + sigma * n, torch.full((2,), sigma))
            got[sigma] = [d.sum().item(), *d.flatten()[:3].tolist()]
    for sigma, values in PINNED[spec.name].items():
        assert got[sigma] == pytest.approx(values, rel=1e-4, abs=1e-4), (sigma, got[sigma])


def test_denoiser_is_close_to_the_exact_one():
    """A learned model, not noise: at sigma 0.5 its error to the exact denoiser is a fraction of the
    exact denoiser's own distance from the clean data."""
    model = load_model('toy_unet')
    x0, n = _pinned_inputs()
    exact = GaussianMixture()
    x = x0 + 0.5 * n
    sigma = torch.full((2,), 0.5)
    d_net, d_exact = model(x, sigma).double(), exact(x.double(), sigma.double())
    assert (d_net - d_exact).norm() < 0.5 * (d_exact - x0.double()).norm()


def test_photo_denoiser_learned_the_photographs():
    """photo_unet denoises photographs it never saw: at sigma 0.2 its output is less than half as far
    from the clean held-out crops as the noisy input is (measured: 0.38; the identity gives 1)."""
    model = load_model('photo_unet')
    g = torch.Generator().manual_seed(0)
    x0 = photo_unet.held_out_data().sample(16, generator=g).float()
    x = x0 + 0.2 * torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        d = model(x, torch.full((16,), 0.2))
    assert (d - x0).norm() < 0.5 * (x - x0).norm()


def test_photo_crops_are_deterministic_scaled_and_flipped():
    """Each crop is a 32x32 window of the photograph average-pooled 4x4 (values in [-1, 1]), as it is
    or mirrored left-right; both occur; the same generator state gives the same crops."""
    import skimage.data
    data = photo_unet.PhotoCrops(['astronaut'], scales=(4,))
    a, b = (data.sample(64, generator=torch.Generator().manual_seed(5)) for _ in range(2))
    assert torch.equal(a, b) and a.shape == (64, 3, 32, 32)
    photo = torch.from_numpy(skimage.data.astronaut()).permute(2, 0, 1).double()
    pooled = photo.reshape(3, 128, 4, 128, 4).mean((2, 4)) / 127.5 - 1
    windows = pooled.unfold(1, 32, 1).unfold(2, 32, 1).permute(1, 2, 0, 3, 4).reshape(-1, 3 * 32 * 32)
    orientation = []
    for crop in a:
        plain = ((windows - crop.flatten()).abs().max(1).values < 1e-9).any().item()
        mirrored = ((windows - crop.flip(-1).flatten()).abs().max(1).values < 1e-9).any().item()
        assert plain or mirrored
        orientation.append(plain)
    assert 0 < sum(orientation) < len(orientation)


def test_reference_solution_converges(spec, model):
    """Doubling the reference's RK4 steps changes the final state by under 1e-4 relative (here on 2
    samples, from sigma 80 to 0.002), while halving them changes it by more (the check measures)."""
    latents = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    steps = spec.steps_per_unit
    ref, fine, coarse = (model.ode_solution_from_noise(latents, 80.0, [0.002], steps_per_unit=s)[-1]
                         for s in (steps, 2 * steps, steps // 2))
    rel = lambda a, b: ((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).max().item()  # noqa: E731
    assert rel(ref, fine) < 1e-4, rel(ref, fine)
    assert rel(coarse, fine) > 4 * rel(ref, fine), (rel(coarse, fine), rel(ref, fine))


def test_training_script_is_deterministic_and_loadable(spec, tmp_path):
    a, b = tmp_path / 'a' / 'net.pt', tmp_path / 'b' / 'net.pt'
    for path in (a, b):
        spec.train(str(path), kimg=0.128, progress=False, command='test')
    assert a.read_bytes() == b.read_bytes()
    meta = json.loads((tmp_path / 'a' / 'net.json').read_text())
    assert meta['sha256'] == sha256_file(a) and meta['recipe']['kimg'] == 0.128
    assert isinstance(load_model(spec.name, model_path=str(a)), builtin_unet.BuiltinUNetDenoiser)


def test_training_cli_writes_what_it_says(tmp_path):
    out = tmp_path / 'net.pt'
    result = CliRunner().invoke(toy_unet.main, [f'--out={out}', '--kimg=0.064', '--no-progress'])
    assert result.exit_code == 0, result.output
    assert f'Wrote {out} (sha256 {sha256_file(out)})' in result.output
    assert json.loads((tmp_path / 'net.json').read_text())['recipe']['kimg'] == 0.064


def test_damaged_checkpoint_gives_one_line(spec, tmp_path):
    path = tmp_path / 'net.pt'
    shutil.copy(spec.weights, path)
    with pytest.raises(ValueError, match='net.json is missing'):
        spec.load(str(path))
    shutil.copy(sidecar_path(spec.weights), tmp_path / 'net.json')
    with open(path, 'r+b') as f:
        f.seek(200)
        f.write(b'\0\0\0\0')
    with pytest.raises(ValueError, match='has sha256 .* its sidecar'):
        spec.load(str(path))


def test_sample_and_train_run_on_it(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(sample.main, [f'--dataset_name={spec.name}', '--solver=ipndm', '--num_steps=6',
                                              '--seeds=0-63', '--grid', '--no-progress', '--outdir=grid'])
    assert result.exit_code == 0, result.output
    assert os.path.isfile('grid/grid.png')
    result = CliRunner().invoke(train.main, [f'--dataset_name={spec.name}', '--batch=4', '--total_kimg=0.008',
                                             '--num_steps=3', '--no-progress', '--outdir=exps', '--check=4'])
    assert result.exit_code == 0, result.output
    assert len(os.listdir('exps')) == 1 and 'Check on 4 held-out trajectories' in result.output


def test_quickstart_prints_the_table_against_the_reference(tmp_path, monkeypatch):
    from evaluation import quickstart
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(quickstart.main, ['--dataset_name=toy_unet', '--kimg=0.008', '--batch=4', '--num=2',
                                                  '--outdir=exps', '--check=4', '--cache_dir=cache',
                                                  '--strip_model=none', '--workers=1'])
    assert result.exit_code == 0, result.output
    assert 'RMS error to reference ODE solution (toy_unet, 2 samples) | NFE 5 |' in result.output
    rows = [line for line in result.output.splitlines() if line.startswith('| ') and 'NFE' not in line]
    assert len(rows) == 6 and os.path.isfile('samples/quickstart-toy_unet/grid.png')
