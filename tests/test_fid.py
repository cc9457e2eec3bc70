"""fid.py and metrics/frechet.py: the Frechet distance against closed forms, calc/ref round trips
with a tiny pickled stand-in detector, the provenance of every value (metrics.jsonl, the npz's
provenance), bad input, torchrun with two processes, the pixel metric on the built-in model, and
two peers in the peer venv with injected weights: our Inception-v3 against pytorch-fid's, and our
statistics and distance against torchmetrics' FrechetInceptionDistance."""

import json
import math
import os
import pickle
import subprocess
import textwrap
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import fid
from models import toy
from models.inception import FIDInception
from tests.fid_standin import StandInDetector
from tests.peers import peer_python
from generation import manifest as sample_manifest
from metrics import frechet, image_sets
from tests.torchrun import torchrun as launch
from torch_utils.misc import parse_int_list
from generation.generate import to_uint8

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_fid(args):
    result = CliRunner().invoke(fid.main, args, catch_exceptions=False)
    return result.exit_code, result.output


def run_fid_error(args):
    """Exit code, the last line on stderr, and all output."""
    result = CliRunner().invoke(fid.main, args, catch_exceptions=False)
    lines = result.stderr.strip().splitlines()
    return result.exit_code, lines[-1] if lines else '', result.output


def write_images(folder, n, size=(16, 16), seed=0, start=0):
    """n random RGB PNGs folder/img<i>.png; returns the uint8 (n, 3, H, W) array in file order."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.RandomState(seed)
    images = rng.randint(0, 256, size=(n, size[1], size[0], 3)).astype(np.uint8)
    for i, img in enumerate(images):
        PIL.Image.fromarray(img).save(os.path.join(folder, f'img{start + i:03d}.png'))
    return images.transpose(0, 3, 1, 2)


def zip_folder(folder, dest):
    with zipfile.ZipFile(dest, 'w') as z:
        for name in sorted(os.listdir(folder)):
            z.write(os.path.join(folder, name), arcname=f'sub/{name}')
    return dest


def direct_stats(features):
    f = np.asarray(features, dtype=np.float64)
    return f.mean(axis=0), np.cov(f, rowvar=False)


def standin_features(images):
    with torch.no_grad():
        return StandInDetector()(torch.from_numpy(np.ascontiguousarray(images))).numpy()


def load_npz(path):
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def one_thread():
    """Inception forwards on one thread: on a shared 2-core machine, two OpenMP threads can be
    ten times slower than one when the other core is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def standin(in_tmp):
    with open('standin.pkl', 'wb') as f:
        pickle.dump(StandInDetector(), f)
    return 'standin.pkl'


# ----------------------------------------------------------------------------
# The Frechet distance.

def test_fd_closed_form_diagonal():
    rng = np.random.RandomState(0)
    m1, m2 = rng.randn(7), rng.randn(7)
    s1, s2 = rng.uniform(0.1, 2, 7), rng.uniform(0.1, 2, 7)    # standard deviations
    expected = np.sum((m1 - m2) ** 2) + np.sum((s1 - s2) ** 2)
    assert frechet.frechet_distance(m1, np.diag(s1 ** 2), m2, np.diag(s2 ** 2)) == pytest.approx(expected, rel=1e-10)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet.frechet_distance([1.0], [[4.0]], [-2.0], [[0.25]]) == pytest.approx(9 + 1.5 ** 2, rel=1e-12)
    assert abs(frechet.frechet_distance(m1, np.diag(s1), m1, np.diag(s1))) < 1e-12


def test_fd_full_covariance_against_eigendecomposition():
    rng = np.random.RandomState(1)
    d = 12
    a, b = rng.randn(d, 2 * d), rng.randn(d, d + 3)
    s1, s2 = a @ a.T / d, b @ b.T / d + 0.1 * np.eye(d)
    m1, m2 = rng.randn(d), rng.randn(d)
    # tr sqrtm(S1 S2) = tr sqrtm(S1^1/2 S2 S1^1/2), a symmetric PSD matrix: eigen-decompositions only.
    w, v = np.linalg.eigh(s1)
    s1_half = (v * np.sqrt(w)) @ v.T
    tr_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(s1_half @ s2 @ s1_half), 0, None)))
    expected = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet.frechet_distance(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(image_sets.MetricError, match='dimensions'):
        frechet.frechet_distance(m1, s1, m2[:3], s2[:3, :3])


# ----------------------------------------------------------------------------
# calc and ref with a stand-in detector.

def test_ref_calc_round_trip_folder_and_zip(standin):
    images = write_images('a', 9)
    other = write_images('b', 7, seed=5)
    code, out = run_fid(['ref', '--data=a', '--dest=refs/a.npz', f'--detector={standin}', '--batch=4',
                         '--workers=0', '--no-progress'])
    assert code == 0, out
    assert 'unpickling executes code' in out and 'images/s' in out
    stats = load_npz('refs/a.npz')
    assert stats['mu'].dtype == np.float64 and stats['sigma'].shape == (16, 16) and str(stats['metric']) == 'FID'
    mu, sigma = direct_stats(standin_features(images))
    assert np.allclose(stats['mu'], mu, rtol=0, atol=1e-12) and np.allclose(stats['sigma'], sigma, rtol=0, atol=1e-12)

    # The same images from a zip (in a subfolder, with image-loading workers) against it: FD ~ 0.
    zip_folder('a', 'a.zip')
    code, out = run_fid(['calc', '--images=a.zip', '--ref=refs/a.npz', f'--detector={standin}', '--batch=2',
                         '--workers=2', '--no-progress'])
    assert code == 0, out
    label, value = out.strip().splitlines()[-1].split(': ')
    assert label == 'FID' and abs(float(value)) < 1e-6

    # Another image set: the printed value is the distance of the two direct statistics (%g).
    code, out = run_fid(['calc', '--images=b', '--ref=refs/a.npz', f'--detector={standin}', '--workers=0',
                         '--no-progress'])
    assert code == 0, out
    expected = frechet.frechet_distance(*direct_stats(standin_features(other)), mu, sigma)
    assert out.strip().splitlines()[-1] == f'FID: {expected:g}'


def last_metrics_line(path):
    with open(path, encoding='utf-8') as f:
        return json.loads(f.read().splitlines()[-1])


def test_calc_and_ref_record_provenance(standin):
    import hashlib  # pylint: disable=import-outside-toplevel
    from metrics.provenance import sha256_file  # pylint: disable=import-outside-toplevel
    write_images('a', 9)
    os.makedirs('b/000000')
    for s in range(7):   # sample.py's layout: <seed - seed % 1000>/<seed>.png
        write_images('tmp', 1, seed=s)
        os.replace('tmp/img000.png', f'b/000000/{s:06d}.png')
    common = [f'--detector={standin}', '--workers=0', '--no-progress']
    code, out = run_fid(['ref', '--data=a', '--dest=a.npz', '--batch=4', *common])
    assert code == 0, out
    record = json.loads(str(load_npz('a.npz')['provenance']))
    assert record['metric'] == 'FID' and 'value' not in record
    assert record['images']['path'] == os.path.abspath('a') and record['images']['num_images'] == 9
    assert record['images']['seeds'] is None          # img000.png ... are not seeds
    names = '\n'.join(f'img{i:03d}.png' for i in range(9)).encode()
    assert record['images']['names_sha256'] == hashlib.sha256(names).hexdigest()
    assert record['detector']['sha256'] == sha256_file(standin) and record['detector']['path'] == standin
    assert record['options']['batch'] == 4 and record['processes'] == 1 and record['time'].endswith('+00:00')

    code, out = run_fid(['calc', '--images=b', '--ref=a.npz', *common])
    assert code == 0, out
    line = last_metrics_line('b/metrics.jsonl')
    assert out.strip().splitlines()[-1] == f'FID: {line["value"]:g}' and line['metric'] == 'FID'
    assert line['images']['seeds'] == '0-6' and line['images']['num_images'] == 7
    assert line['images']['subset'] is None and line['images']['manifest'] is None
    assert line['ref']['path'] == 'a.npz' and line['ref']['sha256'] == sha256_file('a.npz')
    assert line['ref']['provenance']['images']['path'] == os.path.abspath('a')
    assert line['detector']['sha256'] == sha256_file(standin)
    assert line['command'] and line['options']['images'] == 'b' and line['options']['metrics_file'] is None

    # A sample-folder manifest is hashed; a second run appends a line; EDM's files have no provenance.
    json.dump(sample_manifest.make_manifest(dict(source=dict(kind='plain')), range(7)), open('b/manifest.json', 'w'))
    np.savez('edm.npz', mu=load_npz('a.npz')['mu'], sigma=load_npz('a.npz')['sigma'])
    code, out = run_fid(['calc', '--images=b', '--ref=edm.npz', *common])
    assert code == 0, out
    with open('b/metrics.jsonl') as f:
        assert len(f.read().splitlines()) == 2
    line = last_metrics_line('b/metrics.jsonl')
    assert line['images']['manifest'] == dict(path=os.path.abspath('b/manifest.json'),
                                              sha256=sha256_file('b/manifest.json'))
    assert line['ref']['provenance'] is None
    # A zip with a subset: the line goes beside the zip, and says which subset; --metrics_file moves it.
    with zipfile.ZipFile('b.zip', 'w') as z:
        for s in range(7):
            z.write(f'b/000000/{s:06d}.png', arcname=f'000000/{s:06d}.png')
        z.write('b/manifest.json', arcname='manifest.json')
    code, out = run_fid(['calc', '--images=b.zip', '--ref=a.npz', '--num=5', '--seed=1', *common])
    assert code == 0, out
    line = last_metrics_line('metrics.jsonl')
    keep = np.sort(np.random.RandomState(1).choice(7, 5, replace=False))
    assert line['images']['subset'] == dict(num=5, seed=1) and line['images']['num_images'] == 5
    assert parse_int_list(line['images']['seeds']) == keep.tolist()
    assert line['images']['manifest'] == dict(path=os.path.abspath('b.zip') + ':manifest.json',
                                              sha256=sha256_file('b/manifest.json'))
    code, out = run_fid(['calc', '--images=b', '--ref=a.npz', '--metrics_file=logs/fid.jsonl', *common])
    assert code == 0 and last_metrics_line('logs/fid.jsonl')['images']['path'] == os.path.abspath('b')


def test_grayscale_rgba_jpeg_become_rgb(in_tmp):
    os.makedirs('m/deeper')
    rng = np.random.RandomState(2)
    gray = rng.randint(0, 256, (8, 8)).astype(np.uint8)
    rgba = rng.randint(0, 256, (8, 8, 4)).astype(np.uint8)
    PIL.Image.fromarray(gray, 'L').save('m/0.png')
    PIL.Image.fromarray(rgba, 'RGBA').save('m/deeper/1.png')
    PIL.Image.fromarray(rgba[:, :, :3]).save('m/2.JPEG', quality=95)
    open('m/notes.txt', 'w').write('ignored')
    images = image_sets.ImageSet('m')
    assert images.names == ['0.png', '2.JPEG', 'deeper/1.png']
    assert np.array_equal(images.load(0), np.repeat(gray[:, :, None], 3, axis=2))
    assert np.array_equal(images.load(2), rgba[:, :, :3])
    assert images.load(1).shape == (8, 8, 3)


def test_num_subset_is_seeded_and_sorted(standin):
    images = write_images('a', 10)
    picks = [image_sets.ImageSet('a', num=4, seed=s).names for s in (1, 1, 2)]
    assert picks[0] == picks[1] == sorted(picks[0]) and picks[0] != picks[2]
    keep = np.sort(np.random.RandomState(1).choice(10, 4, replace=False))
    assert picks[0] == [f'img{i:03d}.png' for i in keep]
    for dest in ('s1.npz', 's2.npz'):
        code, out = run_fid(['ref', '--data=a', f'--dest={dest}', '--num=4', '--seed=1', f'--detector={standin}',
                             '--workers=0', '--no-progress'])
        assert code == 0, out
    s1, s2 = load_npz('s1.npz'), load_npz('s2.npz')
    assert np.array_equal(s1['mu'], s2['mu']) and np.array_equal(s1['sigma'], s2['sigma'])
    mu, _ = direct_stats(standin_features(images[keep]))
    assert np.allclose(s1['mu'], mu, rtol=0, atol=1e-12)


def test_bad_input_gives_one_line(standin):
    write_images('ok', 3)
    write_images('mixed', 3)
    write_images('mixed', 1, size=(8, 12), start=3)
    write_images('broken', 3)
    open('broken/img001.png', 'wb').write(b'not a png at all')
    write_images('one', 1)
    np.savez('pix.npz', mu=np.zeros(192), sigma=np.eye(192), metric=np.array('FD-pixel8'))
    common = [f'--detector={standin}', '--workers=0', '--no-progress']
    cases = [
        (['ref', '--data=mixed', '--dest=x.npz', *common], ['img003.png', '8x12', '16x16']),
        (['ref', '--data=broken', '--dest=x.npz', *common], ['cannot read image', 'img001.png']),
        (['ref', '--data=one', '--dest=x.npz', *common], ['at least 2']),
        (['ref', '--data=missing', '--dest=x.npz', *common], ['does not exist']),
        (['ref', '--data=ok', '--dest=x.npz', '--num=5', *common], ['only 3 images']),
        (['ref', '--data=ok', '--dest=x.npz', '--detector=net.onnx', '--workers=0'], ['.pkl', '.pth']),
        (['ref', '--data=ok', '--dest=x.npz', '--detector=nothere.pkl', '--workers=0'], ['nothere.pkl']),
        (['ref', '--data=ok', '--dest=x.npz', '--metric=pixel', *common], ['--detector does not apply']),
        (['calc', '--images=ok', '--ref=pix.npz', *common], ['FD-pixel8 statistics', '--metric=pixel']),
        (['calc', '--images=ok', '--ref=nothere.npz', *common], ['nothere.npz']),
        (['calc', '--images=ok', '--ref=pix.npz', '--metric=pixel', '--workers=0', '--num=1'], ['--num']),
    ]
    for args, words in cases:
        code, last, out = run_fid_error(args)
        assert code != 0 and 'Traceback' not in out, (args, out)
        assert last.startswith('Error:') and all(w in last for w in words), (args, out)
    assert not os.path.exists('x.npz') and not os.path.exists('ok/metrics.jsonl')
    # a .pth that is not an FID Inception state dict
    torch.save({'weight': torch.zeros(3)}, 'wrong.pth')
    code, last, out = run_fid_error(['ref', '--data=ok', '--dest=x.npz', '--detector=wrong.pth', '--workers=0',
                                     '--no-progress'])
    assert code != 0 and last.startswith('Error: --detector wrong.pth: not a state dict'), out


def torchrun(args, cwd, nproc=2, check=True):
    result = launch([os.path.join(ROOT, 'fid.py'), *args], cwd, nproc)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_torchrun_two_processes_match_one(standin):
    write_images('a', 11)
    args = ['--data=a', f'--detector={standin}', '--batch=3', '--workers=0', '--no-progress', '--device=cpu']
    code, out = run_fid(['ref', '--dest=one.npz', *args])
    assert code == 0, out
    # --num_images (all 11): torchrun's parser would take --num for its --numa-binding.
    result = torchrun(['ref', '--dest=two.npz', '--num_images=11', *args], os.getcwd())
    assert '2 process(es)' in result.stdout
    one, two = load_npz('one.npz'), load_npz('two.npz')
    assert json.loads(str(two['provenance']))['processes'] == 2
    images_one, images_two = (json.loads(str(x['provenance']))['images'] for x in (one, two))
    assert images_two['names_sha256'] == images_one['names_sha256'] and images_two['subset'] == dict(num=11, seed=0)
    assert np.abs(one['mu'] - two['mu']).max() <= 1e-10
    assert np.abs(one['sigma'] - two['sigma']).max() <= 1e-10
    # An error on one rank's share stops both ranks with the message (no hang at a collective).
    write_images('a', 1, size=(8, 8), start=11)
    result = torchrun(['ref', '--dest=bad.npz', *args], os.getcwd(), check=False)
    assert result.returncode != 0 and 'img011.png is 8x8 pixels' in result.stdout + result.stderr
    assert not os.path.exists('bad.npz')


# ----------------------------------------------------------------------------
# The pixel metric on the built-in model.

def test_pixel_metric_end_to_end(in_tmp):
    code, out = run_fid(['toydata', '--dest=data', '--num=30', '--seed=3', '--no-progress'])
    assert code == 0, out
    files = sorted(os.listdir('data/000000'))
    assert files == [f'{i:06d}.png' for i in range(30)]
    # Exact samples: chunk 0 of toydata is model.sample(100, generator(seed, 0)), mapped as sample.py does.
    state = np.random.SeedSequence([3, 0]).generate_state(2, np.uint32)
    gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    expected = to_uint8(toy.build('toy').sample(100, gen))
    pixels = np.stack([np.asarray(PIL.Image.open(f'data/000000/{f}')) for f in files])
    assert np.array_equal(pixels, expected[:30])
    # A longer run writes the same first images (image i depends on (seed, i) only).
    code, out = run_fid(['toydata', '--dest=more', '--num=120', '--seed=3', '--no-progress'])
    assert code == 0 and np.array_equal(np.asarray(PIL.Image.open('more/000000/000029.png')), pixels[29])

    code, out = run_fid(['ref', '--metric=pixel', '--data=data', '--dest=toy.npz', '--workers=0', '--no-progress'])
    assert code == 0, out
    stats = load_npz('toy.npz')
    assert str(stats['metric']) == 'FD-pixel8' and stats['mu'].shape == (192,)
    pooled = pixels.astype(np.float64).reshape(30, 8, 4, 8, 4, 3).mean(axis=(2, 4)) / 255   # (N, 8, 8, C)
    mu, sigma = direct_stats(pooled.transpose(0, 3, 1, 2).reshape(30, -1))
    assert np.allclose(stats['mu'], mu, rtol=0, atol=1e-12) and np.allclose(stats['sigma'], sigma, atol=1e-12)

    code, out = run_fid(['calc', '--metric=pixel', '--images=more', '--ref=toy.npz', '--workers=0', '--no-progress'])
    assert code == 0, out
    assert 'FID' not in out
    line = last_metrics_line('more/metrics.jsonl')
    assert line['metric'] == 'FD-pixel8' and line['detector']['sha256'] is None and line['images']['seeds'] == '0-119'
    label, value = out.strip().splitlines()[-1].split(': ')
    assert label == 'FD-pixel8' and float(value) > 0


# ----------------------------------------------------------------------------
# Our Inception-v3.

def random_inception(seed=0):
    """FIDInception with random weights that keep activations O(1) through the network."""
    torch.manual_seed(seed)
    net = FIDInception()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.normal_(0, math.sqrt(2 / m.weight[0].numel()))
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net


def test_inception_pth_detector(in_tmp, one_thread):
    net = random_inception()
    torch.save(net.state_dict(), 'random.pth')
    images = write_images('a', 2)
    code, out = run_fid(['ref', '--data=a', '--dest=r.npz', '--detector=random.pth', '--workers=0', '--no-progress'])
    assert code == 0, out
    assert 'state dict' in out and 'unpickling' not in out
    features = net(torch.from_numpy(np.ascontiguousarray(images)), return_features=True)
    assert features.shape == (2, 2048) and features.std() > 0.1
    assert np.allclose(load_npz('r.npz')['mu'], features.double().mean(0).numpy(), rtol=1e-5, atol=1e-5)
    assert net(torch.from_numpy(images[:1]), return_features=False).shape == (1, 1008)


PEER_SCRIPT = textwrap.dedent('''
    import sys
    import numpy as np
    import torch
    import pytorch_fid.inception as pfi

    state_dict = torch.load(sys.argv[1], map_location='cpu', weights_only=True)
    # fid_inception_v3() builds the FID Inception from pytorch-fid's own blocks, then fetches the
    # weights with load_state_dict_from_url: hand it ours instead, so nothing is downloaded.
    pfi.load_state_dict_from_url = lambda url, *args, **kwargs: state_dict
    net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True, normalize_input=True,
                          use_fid_inception=True).eval()
    images = torch.from_numpy(np.load(sys.argv[2]))
    with torch.no_grad():
        features = net(images.float() / 255)[0].flatten(1)
    np.save(sys.argv[3], features.numpy())
''')


def test_inception_matches_pytorch_fid(tmp_path, one_thread):
    peer = peer_python('pytorch_fid')
    net = random_inception(seed=1)
    torch.save(net.state_dict(), tmp_path / 'sd.pth')
    images = np.random.RandomState(0).randint(0, 256, (2, 3, 40, 24)).astype(np.uint8)
    np.save(tmp_path / 'images.npy', images)
    (tmp_path / 'peer.py').write_text(PEER_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS='1')
    result = subprocess.run([peer, str(tmp_path / 'peer.py'), str(tmp_path / 'sd.pth'),
                             str(tmp_path / 'images.npy'), str(tmp_path / 'peer.npy')],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = np.load(tmp_path / 'peer.npy')
    with torch.no_grad():
        ours = net(torch.from_numpy(images), return_features=True).numpy()
    assert ours.shape == theirs.shape == (2, 2048)
    assert np.abs(ours).max() > 1 and ours.std() > 0.1     # the comparison is not between near-zeros
    assert np.abs(ours - theirs).max() <= 1e-4


TORCHMETRICS_SCRIPT = textwrap.dedent('''
    import sys
    import numpy as np
    import torch
    from torchmetrics.image.fid import FrechetInceptionDistance, _compute_fid

    torch.set_num_threads(1)
    weights, images, small, out = sys.argv[1:5]
    # torch-fidelity's Inception under torchmetrics, weights from a local file: nothing is downloaded.
    metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=weights)
    metric.update(torch.from_numpy(np.load(images)), real=True)
    n = metric.real_features_num_samples
    mu = metric.real_features_sum / n
    sigma = (metric.real_features_cov_sum - n * torch.outer(mu, mu)) / (n - 1)    # as its compute()
    s = {k: torch.from_numpy(v) for k, v in np.load(small).items()}
    fid = _compute_fid(s['mu1'], s['sigma1'], s['mu2'], s['sigma2'])
    np.savez(out, mu=mu.numpy(), sigma=sigma.numpy(), fid=fid.item())
''')


def tf_scaled(state):
    """The same network for an input scaled as the TF graph, (x - 128) / 128, instead of x / 127.5 - 1.

    Conv2d_1a (no bias, no padding) is linear: W' = W * 128 / 127.5 gives W' x / 128 = W x / 127.5, and
    the offset changes by sum(W) / 255 per output channel, which the batch norm's running mean absorbs."""
    state = dict(state)
    w = state['Conv2d_1a_3x3.conv.weight'].double()
    state['Conv2d_1a_3x3.conv.weight'] = (w * 128 / 127.5).float()
    state['Conv2d_1a_3x3.bn.running_mean'] = (state['Conv2d_1a_3x3.bn.running_mean'].double()
                                              - w.sum(dim=(1, 2, 3)) / 255).float()
    return state


def test_fid_matches_torchmetrics(in_tmp, one_thread):
    """A second FID peer: torchmetrics' FrechetInceptionDistance (torch-fidelity's Inception) with our
    random weights injected through feature_extractor_weights_path.

    FID = distance(statistics(features)); both halves are checked: the statistics of ``fid.py ref``
    against torchmetrics' accumulated ones (2048-d), and our distance against torchmetrics' on 256-d
    statistics (a 2048-d matrix square root costs 10-20 s on this machine; the full 2048-d comparison
    is in docs/metrics.md, measured once)."""
    peer = peer_python('torchmetrics', 'torch_fidelity')
    net = random_inception(seed=2)
    torch.save(net.state_dict(), 'ours.pth')
    torch.save(tf_scaled(net.state_dict()), 'tf_scaled.pth')
    np.save('images.npy', write_images('real', 3, size=(32, 32), seed=3))
    rng = np.random.RandomState(0)
    a, b = rng.randn(256, 300), rng.randn(256, 280)
    small = dict(mu1=rng.randn(256), sigma1=a @ a.T / 300, mu2=rng.randn(256), sigma2=b @ b.T / 280)
    np.savez('small.npz', **small)
    result = subprocess.run([peer, '-c', TORCHMETRICS_SCRIPT, 'tf_scaled.pth', 'images.npy', 'small.npz',
                             'peer.npz'], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = load_npz('peer.npz')
    code, out = run_fid(['ref', '--data=real', '--dest=real.npz', '--detector=ours.pth', '--workers=0',
                         '--no-progress'])
    assert code == 0, out
    ours = load_npz('real.npz')
    # torchmetrics scales the input as the TF graph does, (x - 128) / 128, where pytorch-fid and our .pth
    # Inception take x / 127.5 - 1: with that compensated in its weights the network function is the same.
    assert np.abs(ours['mu']).max() > 0.1
    assert np.abs(ours['mu'] - theirs['mu']).max() <= 1e-4 * np.abs(ours['mu']).max()
    assert np.abs(ours['sigma'] - theirs['sigma']).max() <= 1e-4 * np.abs(ours['sigma']).max()
    # scipy's sqrtm (ours, EDM's) and torchmetrics' eigenvalues of sigma1 sigma2: the same distance.
    value = frechet.frechet_distance(small['mu1'], small['sigma1'], small['mu2'], small['sigma2'])
    assert value > 100 and abs(float(theirs['fid']) - value) <= 1e-6 * value, (float(theirs['fid']), value)


def test_calc_expects_a_standard_count(standin):
    """calc without --num expects 50,000 images, as EDM: fewer are used with a warning that the
    metrics line records; --num names the count and silences it; more are cut to a seeded subset."""
    write_images('a', 6)
    common = [f'--detector={standin}', '--workers=0', '--no-progress']
    code, out = run_fid(['ref', '--data=a', '--dest=a.npz', *common])
    assert code == 0, out
    code, out = run_fid(['calc', '--images=a', '--ref=a.npz', *common])
    assert code == 0, out
    lines = out.strip().splitlines()
    assert lines[-1].startswith('FID: ') and lines[-2].startswith('Warning: ')
    assert '6 images, fewer than the 50000 of a standard FID' in lines[-2] and out.count('Warning: ') == 2
    assert 'fewer than the 50000' in last_metrics_line('a/metrics.jsonl')['warning']
    code, out = run_fid(['calc', '--images=a', '--ref=a.npz', '--num=6', *common])
    assert code == 0 and 'Warning' not in out and 'warning' not in last_metrics_line('a/metrics.jsonl'), out
    frechet.compute_fd('a', 'a.npz', detector=standin, workers=0, progress=False, expected=4)
    line = last_metrics_line('a/metrics.jsonl')
    assert 'warning' not in line and line['images']['subset'] == dict(num=4, seed=0)
