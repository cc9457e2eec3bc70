"""Frechet distances of image sets: the library behind ``fid.py calc`` and ``fid.py ref``.

Two metrics, each with its own label, and statistics files that say which one made them:

* ``'fid'`` (label ``FID``): 2048-d pool features of the Inception-v3 of the TF graph
  ``inception-2015-12-05``, as in EDM. The detector is NVIDIA's pickle by default
  (:data:`DEFAULT_DETECTOR`, EDM's; its reference statistics were made with it), or a ``.pth``
  state dict for our :class:`models.inception.FIDInception` (e.g. pytorch-fid's
  ``pt_inception-2015-12-05-6726825d.pth``).
* ``'pixel'`` (label ``FD-pixel8``): no network, nothing to download. Images in [0, 1] are
  average-pooled to 8x8 and flattened (3*8*8 = 192 dims). A Frechet distance of raw
  low-resolution pixels: meaningful for the built-in models, never comparable to FID. The pooling
  removes what few-step samplers get wrong first, residual noise and blur.
* ``'spectrum'`` (label ``FD-spectrum``): no network, nothing to download. Per image and channel,
  the log of the power spectrum (images in [0, 1], Hann-windowed, unitary 2-D FFT) averaged over
  half-octave bands of radial frequency from 1/32 cycle per pixel to 1/2, and the corners (9 bands,
  3*9 = 27 dims; images of at least 32x32). Noise raises the top bands and blur lowers them, which
  FD-pixel8 cannot see; chosen among candidates by measurement (docs/metrics.md).

Statistics (EDM's format, extended): an ``.npz`` with ``mu`` (float64 [D]), ``sigma`` (float64
[D, D]) and ``metric`` (the label as a string; files without it, such as EDM's published
references, are taken as ``FID``).

Multi-process: under torchrun each rank extracts features of its share of the images
(:func:`torch_utils.distributed.rank_seeds` over image indices); sum(f) and sum(f^T f) are
accumulated in float64 and summed over ranks with ``all_reduce_sum``. Errors (an unreadable image,
a size mismatch, a missing file) reach every rank, so no rank waits forever at a collective.

Errors meant for the user are :class:`MetricError` (a ValueError) with a one-line message.
"""

import functools
import json
import time
import warnings
import zipfile

import numpy as np
import torch
import torch.distributed
import torch.nn.functional as F
from tqdm import tqdm

import dnnlib
from metrics import provenance as prov
from models.inception import FIDInception
from metrics.image_sets import (ImageSet, MetricError, agree, attempt, image_loader, rank0_then_others,
                                refusal_as_metric_error, start)
from torch_utils import distributed as dist
from torch_utils import locks
from torch_utils import persistence
from torch_utils.misc import atomic_write, check_output_file, state_dict_mismatch, torch_file_problem

DEFAULT_DETECTOR = ('https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/'
                    'inception-2015-12-05.pkl')
PIXEL_RES = 8
METRICS = {'fid': 'FID', 'pixel': f'FD-pixel{PIXEL_RES}', 'spectrum': 'FD-spectrum'}   # CLI name -> label (in the npz)


def _uint8_chw(images, i, img, size):
    """FID input: image i as uint8 (3, H, W), after checking that it has the first image's size."""
    if img.shape[:2] != size:
        raise MetricError(f'image {images.display_name(i)} is {img.shape[1]}x{img.shape[0]} pixels '
                       f'but {images.display_name(0)} is {size[1]}x{size[0]}: all images must have the same size')
    return torch.from_numpy(img).permute(2, 0, 1)


# ----------------------------------------------------------------------------
# Detectors: callables detector(uint8 (N, 3, H, W), return_features=True) -> (N, D).

class PixelFeatures(torch.nn.Module):
    """The 'pixel' metric's features: images in [0, 1] average-pooled to ``res`` x ``res`` (8: FD-pixel8)
    and flattened (C*res*res dims, float64). Uses no weights."""

    def __init__(self, res=PIXEL_RES):
        super().__init__()
        self.res = int(res)

    def forward(self, images, return_features=True):
        if not return_features:
            raise ValueError(f'{type(self).__name__} only returns features')
        return self.features(images.to(torch.float64) / 255)

    def features(self, x):
        return F.adaptive_avg_pool2d(x, self.res).flatten(1)


#: Edges of the 'spectrum' metric's radial frequency bands in cycles per pixel: half octaves from
#: 1/32 to 1/2, and one band from 1/2 to the corners (the DC term is left out).
SPECTRUM_EDGES = tuple(2.0 ** (k / 2 - 5) for k in range(9)) + (1.0,)
#: Added to each band's mean power before the log: the power of uint8 quantisation noise, 1/(12 * 255^2).
SPECTRUM_FLOOR = 1 / (12 * 255 ** 2)


class SpectrumFeatures(PixelFeatures):
    """The 'spectrum' metric's features: per image and channel, log(mean power + floor) in each radial
    frequency band of :data:`SPECTRUM_EDGES` (C * 9 dims, float64). The power spectrum is |F(w x)|^2 of
    the image in [0, 1] times a separable Hann window w scaled to unit mean square (white noise of
    variance s^2 has power s^2 at every frequency), unitary 2-D FFT. ``window=False``: no window."""

    def __init__(self, window=True, edges=SPECTRUM_EDGES):
        super().__init__()
        self.window = bool(window)
        self.edges = tuple(edges)

    def features(self, x):
        h, w = x.shape[-2:]
        if min(h, w) < 32:
            raise MetricError(f'FD-spectrum needs images of at least 32x32 pixels, got {w}x{h}')
        if self.window:
            win = torch.outer(torch.hann_window(h, periodic=False, dtype=x.dtype),
                              torch.hann_window(w, periodic=False, dtype=x.dtype))
            x = (x - x.mean((-2, -1), keepdim=True)) * (win / win.square().mean().sqrt())
        power = torch.fft.fft2(x, norm='ortho').abs().square().flatten(2)
        fy, fx = torch.fft.fftfreq(h, dtype=x.dtype), torch.fft.fftfreq(w, dtype=x.dtype)
        radius = (fy[:, None].square() + fx[None, :].square()).sqrt().flatten()
        bands = [(radius >= lo) & (radius < hi) for lo, hi in zip(self.edges[:-1], self.edges[1:])]
        means = torch.stack([power[..., m].mean(-1) for m in bands], -1)   # (N, C, bands)
        return (means + SPECTRUM_FLOOR).log().flatten(1)


#: The no-network metrics' features and how the provenance record names them.
PIXEL_DETECTORS = {'pixel': (PixelFeatures, f'{METRICS["pixel"]}: {PIXEL_RES}x{PIXEL_RES} average-pooled pixels in [0, 1]'),
                   'spectrum': (SpectrumFeatures, f'{METRICS["spectrum"]}: log band powers of the Hann-windowed '
                                f'power spectrum, {len(SPECTRUM_EDGES) - 1} half-octave bands per channel')}


def image_features(images, metric):
    """Features of a no-network metric (``metric``: 'pixel', 'spectrum' or a feature extractor such as
    :class:`PixelFeatures`) of [-1, 1] images (N, C, H, W), quantised to uint8 as a PNG would be (as
    ``fid.py`` reads them): float64 numpy (N, D)."""
    from generation.generate import to_uint8   # pylint: disable=import-outside-toplevel
    u8 = torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2)
    detector = PIXEL_DETECTORS[metric][0]() if isinstance(metric, str) else metric
    return detector(u8).numpy()


def image_stats(images, metric):
    """(mu, sigma) of :func:`image_features`: what :func:`frechet_distance` compares."""
    f = image_features(images, metric)
    return f.mean(0), np.cov(f, rowvar=False)


def image_fd(images, ref_stats, metric):
    """Frechet distance of [-1, 1] ``images`` to ``ref_stats`` (mu, sigma) under a no-network metric."""
    return frechet_distance(*image_stats(images, metric), *ref_stats)


def _local_file(spec):
    """Download ``spec`` into the dnnlib cache if it is a URL; return a local path."""
    return dnnlib.util.open_url(spec, return_filename=True, verbose=dist.is_main())


def _check_state_dict(state, net, spec):
    """MetricError naming what does not fit when ``state`` is not a state dict of ``net``."""
    what = f'--detector {spec}: not a state dict of the FID Inception-v3 (pytorch-fid pt_inception-2015-12-05-*.pth)'
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MetricError(f'{what}: it holds a {type(state).__name__}')
    mismatch = state_dict_mismatch(net, state)
    if mismatch:
        raise MetricError(f'{what}: {mismatch}')


def _load_detector_file(spec, device):
    base = spec.split('?')[0].lower()
    try:
        path = _local_file(spec)
    except FileNotFoundError as e:
        raise MetricError(f'--detector {spec}: {e.strerror}') from None
    except dnnlib.util.DownloadError as e:
        raise MetricError(str(e)) from None
    if base.endswith('.pth'):
        net = FIDInception()
        try:
            state = torch.load(path, map_location='cpu', weights_only=True)
        except Exception as e:  # a damaged file or one that is not a plain state dict
            problem = torch_file_problem(path)
            if problem.startswith('a zip archive that is not'):   # whole, but not plain tensors: say what torch says
                problem = " ".join(str(e).split())[:200]
            raise MetricError(f'--detector {spec}: cannot load it as weights: {problem}') from None
        _check_state_dict(state, net, spec)
        net.load_state_dict(state, strict=True)
        return net.to(device)
    try:
        net = persistence.load_pickle(path, 'detector', verbose=False)   # the caller printed the note
    except ValueError as e:
        raise MetricError(f'--detector {spec}: cannot unpickle: {e}') from None
    if not callable(net):
        raise MetricError(f'--detector {spec}: the pickle holds a {type(net).__name__}, not a network')
    return net.to(device) if hasattr(net, 'to') else net


def load_detector(spec, device=torch.device('cpu')):
    """Load the FID detector from a path or URL (rank 0 downloads first; cached).

    ``.pth``: a state dict for :class:`models.inception.FIDInception` (``weights_only`` load).
    ``.pkl``: a pickled network called as ``net(images_uint8, return_features=True)``, e.g.
    NVIDIA's :data:`DEFAULT_DETECTOR`; unpickling executes code, so load trusted files only.
    """
    base = spec.split('?')[0].lower()
    if not base.endswith(('.pth', '.pkl')):
        raise MetricError(f'--detector must name a .pkl (a pickled network, e.g. NVIDIA\'s) or a .pth '
                       f'(state dict of the FID Inception-v3), got {spec}')
    if base.endswith('.pkl'):
        dist.print0(f'Loading detector {spec} (unpickling executes code from the file: trusted files only)')
    else:
        dist.print0(f'Loading detector {spec} (FID Inception-v3 state dict)')
    # Used as loaded, as EDM does (FIDInception is in eval mode; a pickle keeps its own mode).
    return rank0_then_others(_load_detector_file, spec, device)


def make_detector(metric, detector=None, device=torch.device('cpu')):
    """The feature extractor for ``metric`` ('fid', 'pixel' or 'spectrum'); ``detector`` is the
    path/URL for 'fid' (default :data:`DEFAULT_DETECTOR`) and must be None for the others."""
    _check_metric(metric)
    if metric in PIXEL_DETECTORS:
        if detector is not None:
            raise MetricError(f'--detector does not apply to --metric={metric} (it uses no network)')
        return PIXEL_DETECTORS[metric][0]()
    return load_detector(detector or DEFAULT_DETECTOR, device)


# ----------------------------------------------------------------------------
# Statistics.

@torch.no_grad()
def feature_stats(images, detector, batch=64, device=torch.device('cpu'), workers=2, progress=True):
    """Mean and covariance of the detector's features over an :class:`ImageSet`.

    Every rank handles its share of the images; returns (mu float64 [D], sigma float64 [D, D]) as
    numpy arrays on every rank, with sigma = (sum f^T f - n mu mu^T) / (n - 1)."""
    n = len(images)
    first = images.load(0)  # every rank: the size every image must have, and the feature dimension
    size = first.shape[:2]
    probe = detector(torch.from_numpy(first).permute(2, 0, 1)[None].to(device), return_features=True)
    if probe.ndim != 2 or probe.shape[0] != 1:
        raise MetricError(f'the detector returned shape {tuple(probe.shape)} for one image; expected (1, D)')
    dim = probe.shape[1]

    batches = dist.rank_seeds(range(n), batch)
    loader = image_loader(images, batches, functools.partial(_uint8_chw, size=size), workers)
    mu_sum = torch.zeros([dim], dtype=torch.float64, device=device)
    sigma_sum = torch.zeros([dim, dim], dtype=torch.float64, device=device)
    count = torch.zeros([1], dtype=torch.float64, device=device)
    start = time.time()
    for _, x, err in tqdm(loader, total=len(batches), unit='batch', disable=not (progress and dist.is_main()),
                          dynamic_ncols=True):
        agree(err)
        if x is None:
            continue
        f = detector(x.to(device), return_features=True).to(torch.float64)
        if f.shape != (x.shape[0], dim):
            raise MetricError(f'the detector returned shape {tuple(f.shape)} for {x.shape[0]} images; '
                           f'expected ({x.shape[0]}, {dim})')
        mu_sum += f.sum(dim=0)
        sigma_sum += f.T @ f
        count += f.shape[0]
    for t in (mu_sum, sigma_sum, count):
        dist.all_reduce_sum(t)
    elapsed = time.time() - start
    assert int(count.item()) == n, (count.item(), n)
    dist.print0(f'Features of {n} images in {elapsed:.1f} s: {n / max(elapsed, 1e-9):.1f} images/s '
                f'({dist.get_world_size()} process(es), batch {batch} per process, {device.type})')
    mu = mu_sum / n
    sigma = (sigma_sum - n * torch.outer(mu, mu)) / (n - 1)
    mu, sigma = mu.cpu().numpy(), sigma.cpu().numpy()
    check_finite_stats(mu, sigma, f'the detector\'s features of {images.path}')
    return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)), real part (scipy.linalg.sqrtm), as EDM."""
    import scipy.linalg  # pylint: disable=import-outside-toplevel  (half a second; only rank 0 of calc needs it)
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise MetricError(f'the statistics have different dimensions: {mu1.shape[0]} and {mu2.shape[0]}')
    m = np.square(mu1 - mu2).sum()
    with warnings.catch_warnings():  # singular products are common (fewer images than dimensions): as EDM's disp=False
        warnings.simplefilter('ignore', scipy.linalg.LinAlgWarning)
        s = scipy.linalg.sqrtm(np.dot(sigma1, sigma2))
    return float(np.real(m + np.trace(sigma1 + sigma2 - s * 2)))


def save_stats(dest, mu, sigma, metric, provenance=None):
    """Write ``mu``, ``sigma``, the metric's label and (optionally) the ``provenance`` record (as a JSON
    string) to ``dest`` (.npz) atomically, creating folders."""
    extra = {} if provenance is None else dict(provenance=np.array(json.dumps(provenance)))
    def write(tmp):
        with open(tmp, 'wb') as f:  # np.savez on a file object keeps the name exactly as given
            np.savez(f, mu=mu, sigma=sigma, metric=np.array(METRICS[metric]), **extra)
    atomic_write(dest, write)


def check_finite_stats(mu, sigma, what):
    """MetricError naming ``what`` when the statistics hold NaN or infinities: a distance from them
    would be NaN, not a number to report."""
    bad = {name: int((~np.isfinite(np.asarray(v, np.float64))).sum()) for name, v in (('mu', mu), ('sigma', sigma))}
    if any(bad.values()):
        raise MetricError(f'{what}: the statistics are not finite ({", ".join(f"{n} holds {c} NaN or infinite values" for n, c in bad.items() if c)})')


def check_covariance(sigma, what):
    """MetricError naming ``what`` when ``sigma`` is not a covariance matrix: not symmetric, or with
    a clearly negative eigenvalue (beyond rounding). A distance from such statistics can be
    negative or meaningless."""
    sigma = np.asarray(sigma, np.float64)
    scale = max(float(np.abs(sigma).max()), 1e-300)
    asym = float(np.abs(sigma - sigma.T).max())
    if asym > 1e-6 * scale:
        raise MetricError(f'{what}: sigma is not a covariance matrix (not symmetric: entries differ from their '
                          f'transposes by up to {asym:.3g})')
    lowest = float(np.linalg.eigvalsh((sigma + sigma.T) / 2)[0])
    if lowest < -1e-6 * scale:
        raise MetricError(f'{what}: sigma is not a covariance matrix (it has a negative eigenvalue, {lowest:.3g})')


def load_stats(ref):
    """Read statistics from a path or URL (downloads are cached): dict with mu, sigma, metric
    (the label; ``FID`` for files without one, such as EDM's references) and provenance (the
    record ``fid.py ref`` stored, or None)."""
    try:
        with dnnlib.util.open_url(ref, verbose=dist.is_main()) as f:
            if not zipfile.is_zipfile(f):
                raise MetricError(f'{ref} is not a statistics file (.npz, a zip archive with mu and sigma)')
            f.seek(0)
            data = dict(np.load(f, allow_pickle=False))
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        if isinstance(e, MetricError):
            raise
        raise MetricError(f'cannot read reference statistics {ref}: {" ".join(str(e).split())}') from None
    missing = [k for k in ('mu', 'sigma') if k not in data]
    if missing:
        raise MetricError(f'{ref} is not a statistics file: it lacks {", ".join(missing)}')
    mu, sigma = data['mu'], data['sigma']
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise MetricError(f'{ref}: mu {mu.shape} and sigma {sigma.shape} do not fit together')
    check_finite_stats(mu, sigma, ref)
    check_covariance(sigma, ref)
    metric = str(data['metric']) if 'metric' in data else METRICS['fid']
    try:
        provenance = json.loads(str(data['provenance'])) if 'provenance' in data else None
    except ValueError:
        provenance = None
    return dict(mu=mu.astype(np.float64), sigma=sigma.astype(np.float64), metric=metric, provenance=provenance)


# ----------------------------------------------------------------------------
# The commands.

def _check_metric(metric):
    if metric not in METRICS:
        raise MetricError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")


def detector_record(metric, detector=None):
    """The ``detector`` entry of a provenance record: the file and its sha256 ('fid'); no file ('pixel',
    'spectrum')."""
    if metric in PIXEL_DETECTORS:
        return dict(name=PIXEL_DETECTORS[metric][1], sha256=None)
    return prov.file_record(detector or DEFAULT_DETECTOR)


def _provenance(images, num, seed, metric, detector, options):
    """Rank 0: the provenance record of a run on ``images`` (an :class:`ImageSet`)."""
    return dict(metric=METRICS[metric], images=prov.images_record(images, num, seed),
                detector=detector_record(metric, detector), **prov.run_record(options))


def compute_ref(data, dest, metric='fid', detector=None, num=None, seed=0, batch=64, device=None, workers=2,
                progress=True, overwrite=False):
    """Statistics of the images in ``data`` (folder or zip), written to ``dest`` by rank 0 with their
    provenance (:mod:`metrics.provenance`; the JSON string ``provenance`` in the npz). Returns (mu, sigma).

    Before the feature pass: ``dest`` must be writable as a file, and an existing one is refused
    unless ``overwrite``; rank 0 holds ``dest`` under a lock (:mod:`torch_utils.locks`) until it is
    written. An image set with sample manifests must be one configuration's complete set
    (:meth:`metrics.image_sets.ImageSet.integrity`): a reference from a partial or mixed set would
    shift every distance measured against it."""
    options = dict(data=data, dest=dest, metric=metric, detector=detector, num=num, seed=seed, batch=batch,
                   device=device, workers=workers)
    _check_metric(metric)
    dev = start(device)
    _, err = attempt(refusal_as_metric_error, check_output_file, dest, '--dest', overwrite) if dist.is_main() \
        else (None, None)
    agree(err)
    lock, err = attempt(locks.lock_on_rank0, dest, f'--dest {dest}', is_file=True, wait=1.0)
    agree(err)
    try:
        return _compute_ref(data, dest, metric, detector, num, seed, batch, dev, workers, progress, overwrite, options)
    finally:
        if lock is not None:
            lock.release(cleanup=True)


def _compute_ref(data, dest, metric, detector, num, seed, batch, dev, workers, progress, overwrite, options):
    _, err = attempt(refusal_as_metric_error, check_output_file, dest, '--dest', overwrite) if dist.is_main() \
        else (None, None)
    agree(err)
    images, err = attempt(ImageSet, data, num=num, seed=seed)
    agree(err)
    report, err = attempt(images.integrity)
    if report is not None and not report['complete']:
        err = (f"{report['message']}: reference statistics need the whole set (finish the run that writes "
               f"it, e.g. with its --resume, or rerun fid.py toydata with the same options)")
    agree(err)
    net = make_detector(metric, detector, dev)
    dist.print0(f'Computing {METRICS[metric]} statistics of {len(images)} images in {data}...')
    mu, sigma = feature_stats(images, net, batch=batch, device=dev, workers=workers, progress=progress)
    if dist.is_main():
        record, err = attempt(_provenance, images, num, seed, metric, detector, options)
        if err is None:
            _, err = attempt(save_stats, dest, mu, sigma, metric, record)
    agree(err if dist.is_main() else None)
    dist.print0(f'Saved {dest}')
    return mu, sigma


#: The number of images of a standard FID (EDM's `fid.py calc --num`).
STANDARD_NUM = 50000


def compute_fd(images, ref, metric='fid', detector=None, num=None, seed=0, batch=64, device=None, workers=2,
               progress=True, metrics_file=None, expected=None):
    """Frechet distance of ``images`` (folder or zip) to the statistics ``ref`` (path or URL).

    ``expected`` (with ``num`` None): the number of images the value should rest on, as EDM's
    ``--num``. A set with more uses a seeded subset of that many; a set with fewer uses all of them
    and prints a warning, which the metrics file records as ``warning``.

    Rank 0 appends the value and its provenance to ``metrics_file`` (default ``metrics.jsonl`` beside
    the images, :mod:`metrics.provenance`), prints ``<label>: <value %g>`` and returns the value;
    other ranks return None."""
    options = dict(images=images, ref=ref, metric=metric, detector=detector, num=num, seed=seed, batch=batch,
                   device=device, workers=workers, metrics_file=metrics_file)
    _check_metric(metric)
    dev = start(device)
    label = METRICS.get(metric)
    log = prov.metrics_file(images, metrics_file)
    stats, err = None, None
    if dist.is_main():
        stats, err = attempt(load_stats, ref)
        if stats is not None and stats['metric'] != label:
            other = next((k for k, v in METRICS.items() if v == stats['metric']), None)
            hint = f' (use --metric={other})' if other else ''
            err = f'{ref} holds {stats["metric"]} statistics, not {label}{hint}'
        err = err or prov.check_writable(log)
    agree(err)
    image_set, err = attempt(ImageSet, images, num=num, seed=seed)
    agree(err)
    warning = None
    if num is None and expected is not None:
        if len(image_set) > expected:
            num = expected
            image_set = ImageSet(images, num=num, seed=seed)
        elif len(image_set) < expected:
            warning = (f'{images} holds {len(image_set)} images, fewer than the {expected} of a standard '
                       f'{label}: the value is not comparable with {expected}-image values (--num={len(image_set)} '
                       'asks for this count)')
            dist.print0(f'Warning: {warning}')
    report, err = attempt(image_set.integrity)
    agree(err)
    if report:
        dist.print0(report['message'])
    net = make_detector(metric, detector, dev)
    dist.print0(f'Computing {label} of {len(image_set)} images in {images} against {ref}...')
    mu, sigma = feature_stats(image_set, net, batch=batch, device=dev, workers=workers, progress=progress)
    if not dist.is_main():
        return None
    if mu.shape != stats['mu'].shape:
        raise MetricError(f'{ref} holds {stats["mu"].shape[0]}-d statistics but the detector makes '
                       f'{mu.shape[0]}-d features: the reference was made with another detector')
    value = frechet_distance(mu, sigma, stats['mu'], stats['sigma'])
    if not np.isfinite(value):   # finite statistics whose matrix square root failed
        raise MetricError(f'{label} of {images} against {ref} is not a number ({value}): the covariances are degenerate')

    def write_line():
        record = _provenance(image_set, num, seed, metric, detector, options)
        record = dict(metric=label, value=value, **({'warning': warning} if warning else {}),
                      **{k: v for k, v in record.items() if k != 'metric'})
        if report:   # a set with manifests: whether it was complete
            record['images'] = dict(record['images'], complete=report['complete'], asked=report['asked'],
                                    missing=report['missing'], incomplete=not report['complete'])
        prov.append(log, dict(record, ref=prov.file_record(ref, provenance=stats['provenance'])))
    _, err = attempt(write_line)
    if err:
        raise MetricError(f'{label}: {value:g}, but the metrics file could not be written: {err}')
    if warning:
        print(f'Warning: {warning}')
    print(f'{label}: {value:g}')
    return value
