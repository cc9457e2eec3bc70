"""Overhead benchmark: how much of a sampling run is *not* network calls.

Builds a CIFAR-10-sized network with our own code (VPPrecond + SongUNet, EDM's official
``edm-cifar10-32x32-uncond-vp`` configuration, random weights, seed 0) wrapped as
:class:`models.edm.EDMDenoiser`, and a random-weight AMED predictor
(``AMEDPredictor(scale_dir=0.01, scale_time=0.2)``). For every student at NFE 5

* AMED-Solver (predictor only),
* Euler, iPNDM (max_order 4), DPM-Solver-2, DPM-Solver++ (max_order 3), each with and without
  the AMED plugin,

all with the analytical first step (AFS; predictor runs use ``num_steps=4``, plain runs the
``num_steps`` that give NFE 5: euler/ipndm/dpmpp 7, dpm 4), it times whole sampling runs and one
bare network call at the same batch, and reports per configuration

* the wall time per batch (median of ``--repeats`` runs after ``--warmup`` untimed ones),
* the NFE (counted during every run and checked against :func:`solvers.count_nfe`),
* ``ratio = wall_time / (NFE x one network call)``; ``ratio - 1`` is the overhead of everything
  but the network calls (predictor, feature hook, schedule, solver arithmetic). Target: at most
  3 % (ratio <= 1.03) for the predictor runs;
* ``vs plain``: the wall time of a predictor run over that of the plain run of the same solver
  at the same NFE.

The bare network calls (``--calls`` of them before every timed sampling run) are interleaved
with the sampling runs, and the configuration order rotates from round to round, so slow drift
of a shared machine hits both alike; the network time is the median of all of them.

Usage (from anywhere; the repository root is put on ``sys.path``)::

    python benchmarks/overhead.py [--device cpu|cuda] [--batch 64] [--repeats N] [--out docs/benchmarks.md]

Defaults depend on the device. CUDA: batch 64, 10 repeats, 1 warm-up run per configuration,
5 bare calls per timed run. CPU: batch 1, 3 repeats, no per-configuration warm-up runs, 1 bare
call per timed run: about 1.5 minutes on an idle 2-core CPU, up to about 6 on a busy one (one
CIFAR-size call at batch 64 takes 30-60 s there, so batch 64 cannot fit a few-minute run; ask
for it with ``--batch 64``). Both start with two untimed network calls and two predictor calls.
``torch.set_num_threads`` is left as is.

Also measured (cheap, and free of the noise of the network calls): the non-network time of
every configuration, with the network replaced by :class:`StubDenoiser` (cached outputs, the
feature hook still fed an activation of the real shape), and one predictor call on its own.

With ``--out`` the Markdown report (exact command, device, torch version, date, batch) is
written into the file between ``<!-- overhead:<device>:start -->`` and
``<!-- overhead:<device>:end -->`` (``<device>`` is cpu or cuda, so the CPU and the GPU record
live side by side); all other text of the file is kept.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import dataclasses     # noqa: E402
import datetime        # noqa: E402
import platform        # noqa: E402
import shlex           # noqa: E402
import statistics      # noqa: E402
import time            # noqa: E402
from typing import Optional  # noqa: E402

import click           # noqa: E402
import torch           # noqa: E402

import solvers         # noqa: E402
from evaluation import accuracy                     # noqa: E402
from models.base import Denoiser                     # noqa: E402
from models.edm import EDMDenoiser                   # noqa: E402
from models.networks_edm import build_from_config   # noqa: E402
from predictors.networks import AMEDPredictor         # noqa: E402

# EDM's official CIFAR-10 network (edm-cifar10-32x32-uncond-vp.pkl): the constructor arguments
# stored in that pickle (DDPM++ backbone, VP preconditioning; 55.7M parameters).
CIFAR10_CONFIG = {
    'precond': 'VPPrecond',
    'model_type': 'SongUNet',
    'img_resolution': 32,
    'img_channels': 3,
    'label_dim': 0,
    'augment_dim': 9,
    'dropout': 0.13,
    'model_channels': 128,
    'channel_mult': [2, 2, 2],
    'channel_mult_noise': 1,
    'embedding_type': 'positional',
    'encoder_type': 'standard',
    'decoder_type': 'standard',
    'resample_filter': [1, 1],
}

PREDICTOR_KWARGS = dict(scale_dir=0.01, scale_time=0.2)
NFE = 5
TARGET_RATIO = 1.03
DEFAULTS = {
    'cuda': dict(batch=64, repeats=10, warmup=1, calls=5),
    'cpu': dict(batch=1, repeats=3, warmup=0, calls=1),
}
SOLVER_LABELS = {'amed': 'AMED-Solver', 'euler': 'Euler', 'ipndm': 'iPNDM', 'dpm': 'DPM-Solver-2',
                 'dpmpp': 'DPM-Solver++(3M)'}


# ----------------------------------------------------------------------------------------------
# The configurations.

@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One timed sampling configuration (all at NFE 5 with AFS)."""
    solver: str
    predictor: bool
    num_steps: int
    max_order: Optional[int] = None
    afs: bool = True

    @property
    def label(self):
        name = SOLVER_LABELS[self.solver]
        if solvers.REGISTRY[self.solver].needs_predictor:
            return name
        return f'{name} + AMED-Plugin' if self.predictor else name

    @property
    def nfe(self):
        return solvers.count_nfe(self.solver, self.num_steps, afs=self.afs, with_predictor=self.predictor)

    def sample_kwargs(self):
        return dict(solver=self.solver, num_steps=self.num_steps, afs=self.afs, max_order=self.max_order)


#: The students of the paper's tables (the baselines ipndm_v and deis run the same plugin code).
PAPER_STUDENTS = ('amed', 'euler', 'ipndm', 'dpm', 'dpmpp')


def default_configs():
    """AMED-Solver, then each plugin solver of the paper with and without the predictor (NFE 5, AFS)."""
    configs = []
    for name in PAPER_STUDENTS:
        cls = solvers.REGISTRY[name]
        for predictor in (True, False) if not cls.needs_predictor else (True,):
            configs.append(RunConfig(name, predictor, accuracy.steps_for_nfe(name, NFE, True, predictor),
                                     cls.max_order_limit))
    for c in configs:
        if c.nfe != NFE:
            raise RuntimeError(f'{c.label}: NFE {c.nfe}, expected {NFE}')
    return configs


# ----------------------------------------------------------------------------------------------
# Building and timing.

def build_model(net_config=None, device='cpu', seed=0):
    """(EDMDenoiser around a random-weight preconditioned network, random-weight AMEDPredictor).

    Both are built on the CPU from ``torch.manual_seed(seed)`` (so the weights do not depend on
    the device), then moved to ``device`` in eval mode without gradients."""
    torch.manual_seed(seed)
    net = build_from_config(dict(CIFAR10_CONFIG if net_config is None else net_config), device='cpu')
    model = EDMDenoiser(net).eval().requires_grad_(False).to(device)
    predictor = AMEDPredictor(**PREDICTOR_KWARGS).eval().requires_grad_(False).to(device)
    return model, predictor


def device_name(device):
    device = torch.device(device)
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    cpu = None
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    cpu = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    cpu = cpu or platform.processor() or platform.machine() or 'unknown CPU'
    return f'{cpu} ({os.cpu_count()} logical CPUs, torch threads: {torch.get_num_threads()})'


def _load():
    try:
        return '{:.2f} {:.2f} {:.2f}'.format(*os.getloadavg())
    except (AttributeError, OSError):
        return None


class _CallCounter:
    """Counts calls of the denoiser (a forward pre-hook; the same few microseconds are added to
    the bare calls and to the calls inside sampling runs, so they cancel in the ratio)."""

    def __init__(self, module):
        self.count = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.count += 1

    def remove(self):
        self.handle.remove()


class StubDenoiser(Denoiser):
    """A zero-cost stand-in for ``model``: every call passes the real network's cached 8x8
    activation through ``feature_module`` (an identity, so the AMED feature hook fires and reduces
    an activation of the real shape) and returns the real network's cached output. A sampling run
    on it costs everything a real run costs except the network itself."""

    def __init__(self, model, x, sigma):
        super().__init__()
        self.sigma_min, self.sigma_max = model.sigma_min, model.sigma_max
        self.img_channels, self.img_resolution, self.label_dim = model.img_channels, model.img_resolution, 0
        holder = {}
        handle = model.feature_module.register_forward_hook(lambda m, i, out: holder.update(act=out.detach()))
        try:
            self._denoised = model(x, sigma).detach()
        finally:
            handle.remove()
        self._activation = holder['act']
        self.feature_module = torch.nn.Identity()

    def forward(self, x, sigma, cond=None):
        self.feature_module(self._activation)
        return self._denoised


def run_benchmark(device='cpu', batch=None, repeats=None, warmup=None, calls=None, net_config=None, seed=0,
                  configs=None, stub_runs=20, log=None):
    """Time every configuration; returns a dict with ``meta``, ``net_call_s`` and ``rows``.

    Each row: label, solver, predictor, num_steps, max_order, nfe, wall_s (median), walls_s (all
    timed runs), ratio = wall_s / (nfe * net_call_s), overhead = ratio - 1, vs_plain (wall_s over
    that of the plain run of the same solver, or None); stub_s: the median time of the same run
    with the network replaced by :class:`StubDenoiser` (``stub_runs`` runs per configuration, after
    two untimed ones), i.e. the non-network time measured directly, and stub_ratio =
    1 + stub_s / (nfe * net_call_s). Options left at None take the device's defaults
    (:data:`DEFAULTS`). ``log``: a callable for progress lines, or None.
    """
    device = torch.device(device)
    defaults = DEFAULTS['cuda' if device.type == 'cuda' else 'cpu']
    batch = defaults['batch'] if batch is None else int(batch)
    repeats = defaults['repeats'] if repeats is None else int(repeats)
    warmup = defaults['warmup'] if warmup is None else int(warmup)
    calls = defaults['calls'] if calls is None else int(calls)
    if batch < 1 or repeats < 1 or warmup < 0 or calls < 1 or stub_runs < 1:
        raise ValueError('batch, repeats, calls and stub_runs must be >= 1 and warmup >= 0')
    configs = default_configs() if configs is None else list(configs)
    say = log or (lambda msg: None)

    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize(device)

    model, predictor = build_model(net_config, device, seed)
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, *model.img_shape, generator=gen, dtype=torch.float32).to(device)
    sigma = torch.ones(batch, dtype=torch.float32, device=device)
    x_bare = latents * sigma.reshape(-1, 1, 1, 1)

    counter = _CallCounter(model)
    net_times = []
    walls = {c: [] for c in configs}
    start_load = _load()
    start = time.perf_counter()

    def bare_call():
        sync()
        t0 = time.perf_counter()
        model(x_bare, sigma)
        sync()
        return time.perf_counter() - t0

    def sampling_run(c, net=model, counter=counter):
        counter.count = 0
        sync()
        t0 = time.perf_counter()
        solvers.sample(net, latents, predictor=predictor if c.predictor else None, **c.sample_kwargs())
        sync()
        elapsed = time.perf_counter() - t0
        if counter.count != c.nfe:
            raise RuntimeError(f'{c.label}: {counter.count} network calls, count_nfe says {c.nfe}')
        return elapsed

    try:
        with torch.no_grad():
            for _ in range(2):
                bare_call()
            feature = torch.zeros(batch, 8, 8, device=device)
            for _ in range(2):
                predictor(feature, model.sigma_max, model.sigma_min)
            for c in configs:
                for _ in range(warmup):
                    sampling_run(c)
            say(f'warm-up done ({time.perf_counter() - start:.1f} s)')
            for rnd in range(repeats):
                shift = rnd % len(configs)
                for c in configs[shift:] + configs[:shift]:
                    for _ in range(calls):
                        net_times.append(bare_call())
                    walls[c].append(sampling_run(c))
                say(f'round {rnd + 1}/{repeats} done ({time.perf_counter() - start:.1f} s, '
                    f'network call so far {statistics.median(net_times) * 1e3:.1f} ms)')
    finally:
        counter.remove()

    # The same runs with the network stubbed out: the non-network time, free of network noise.
    with torch.no_grad():
        stub = StubDenoiser(model, x_bare, sigma)
    stub_counter = _CallCounter(stub)
    stub_times = {c: [] for c in configs}
    try:
        with torch.no_grad():
            for c in configs:
                for _ in range(2):
                    sampling_run(c, stub, stub_counter)
            for _ in range(stub_runs):
                for c in configs:
                    stub_times[c].append(sampling_run(c, stub, stub_counter))
    finally:
        stub_counter.remove()
    say(f'stubbed-network runs done ({time.perf_counter() - start:.1f} s)')

    # One predictor call on its own (the zero feature the AFS step gives it).
    pred_times = []
    with torch.no_grad():
        for i in range(2 + stub_runs):
            sync()
            t0 = time.perf_counter()
            predictor(feature, model.sigma_max, model.sigma_min)
            sync()
            if i >= 2:
                pred_times.append(time.perf_counter() - t0)

    net = statistics.median(net_times)
    rows = []
    plain = {c.solver: statistics.median(walls[c]) for c in configs if not c.predictor}
    for c in configs:
        wall = statistics.median(walls[c])
        ratio = wall / (c.nfe * net)
        vs_plain = wall / plain[c.solver] if c.predictor and c.solver in plain else None
        stub_s = statistics.median(stub_times[c])
        rows.append(dict(label=c.label, solver=c.solver, predictor=c.predictor, num_steps=c.num_steps,
                         max_order=c.max_order, afs=c.afs, nfe=c.nfe, wall_s=wall, walls_s=list(walls[c]),
                         ratio=ratio, overhead=ratio - 1, vs_plain=vs_plain, stub_s=stub_s,
                         stub_ratio=1 + stub_s / (c.nfe * net)))
    net_desc = 'official EDM CIFAR-10 config' if net_config is None or dict(net_config) == CIFAR10_CONFIG \
        else f'config {dict(net_config)}'
    meta = dict(device=str(device), device_name=device_name(device), torch_version=torch.__version__,
                net_config=net_desc,
                batch=batch, repeats=repeats, warmup=warmup, calls=calls, stub_runs=stub_runs,
                num_threads=torch.get_num_threads(),
                num_params=sum(p.numel() for p in model.net.parameters()),
                predictor_params=sum(p.numel() for p in predictor.parameters()),
                net_calls=len(net_times), net_call_min_s=min(net_times), net_call_max_s=max(net_times),
                predictor_call_s=statistics.median(pred_times),
                load_start=start_load, load_end=_load(), total_s=time.perf_counter() - start,
                date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'))
    return dict(meta=meta, net_call_s=net, rows=rows)


# ----------------------------------------------------------------------------------------------
# Reporting.

def _ms(seconds):
    ms = seconds * 1e3
    return f'{ms:.0f}' if ms >= 1000 else f'{ms:.1f}' if ms >= 10 else f'{ms:.2f}'


def format_table(result):
    """The Markdown table: one row per configuration."""
    lines = ['| configuration | predictor | num_steps | NFE | wall time / batch (ms): median (min-max) '
             '| ratio | overhead | vs plain | non-network time, net stubbed (ms) | ratio from it |',
             '|---|:-:|--:|--:|--:|--:|--:|--:|--:|--:|']
    for r in result['rows']:
        label = r['label'] + (f" (order {r['max_order']})" if r['max_order'] and r['solver'] == 'ipndm' else '')
        vs = '' if r['vs_plain'] is None else f"{r['vs_plain']:.3f}"
        wall = _ms(r['wall_s'])
        if len(r['walls_s']) > 1:
            wall += f" ({_ms(min(r['walls_s']))}-{_ms(max(r['walls_s']))})"
        lines.append(f"| {label} | {'yes' if r['predictor'] else 'no'} | {r['num_steps']} | {r['nfe']} "
                     f"| {wall} | {r['ratio']:.3f} | {100 * r['overhead']:+.1f} % | {vs} "
                     f"| {_ms(r['stub_s'])} | {r['stub_ratio']:.4f} |")
    return '\n'.join(lines)


def format_report(result, command=None):
    """Title, run details, the table and a short reading guide (Markdown)."""
    m = result['meta']
    pred = [r for r in result['rows'] if r['predictor']]
    load = ''
    if m['device'].startswith('cpu') and m['load_start'] is not None:
        load = f"\n- load average (1, 5, 15 min) at start / end: {m['load_start']} / {m['load_end']}"
    lines = [
        f"### Overhead of the solvers and the AMED predictor ({m['device']})",
        '',
        f"- command: `{command}`" if command else None,
        f"- device: {m['device_name']}",
        f"- torch {m['torch_version']}; date: {m['date']}",
        f"- batch {m['batch']} (float32 latents); network: VPPrecond + SongUNet, {m['net_config']}, random "
        f"weights, {m['num_params'] / 1e6:.1f}M parameters; AMED predictor: {m['predictor_params']} parameters "
        "(scale_dir 0.01, scale_time 0.2), random weights",
        f"- wall time: median of {m['repeats']} runs after {m['warmup']} warm-up run(s) per configuration; "
        f"one network call: median of {m['net_calls']} bare calls interleaved with the runs = "
        f"{_ms(result['net_call_s'])} ms (min {_ms(m['net_call_min_s'])}, max {_ms(m['net_call_max_s'])})"
        + load,
        f"- non-network time: median of {m['stub_runs']} runs per configuration with the network replaced by a "
        "stub that returns its cached output and feeds its cached 8x8 activation through the feature hook; "
        f"one AMED predictor call on its own: {_ms(m['predictor_call_s'])} ms (median of {m['stub_runs']})",
        f"- whole benchmark: {m['total_s']:.0f} s",
        '',
        format_table(result),
        '',
        'ratio = wall time / (NFE x one bare network call); ratio - 1 is the cost of everything but the '
        'network calls (predictor, feature hook, schedule, solver arithmetic). vs plain = wall time of the '
        'predictor run / wall time of the plain run of the same solver at the same NFE. The last two columns '
        'measure that cost directly (ratio from it = 1 + non-network time / (NFE x net call)), free of the '
        'noise of the network calls; on a GPU, CPU work that overlaps queued network kernels makes it an '
        'upper bound. All runs use AFS.',
        '',
    ]
    if pred:
        for key, what in (('ratio', 'wall-time ratio'), ('stub_ratio', 'ratio from the non-network time')):
            ok = sum(r[key] <= TARGET_RATIO for r in pred)
            worst = max(pred, key=lambda r: r[key])
            lines.append(f"Target ratio <= {TARGET_RATIO:.2f} for the predictor runs, {what}: met by {ok} of "
                         f"{len(pred)} (largest: {worst['label']}, {worst[key]:.4f}).")
    if m['batch'] != 64:
        why = (' (the CPU default: a CIFAR-size network call at batch 64 takes 30-60 s on a 2-core CPU)'
               if m['device'].startswith('cpu') and m['batch'] == DEFAULTS['cpu']['batch'] else '')
        lines.append(f"The reference setting is batch 64; this run used batch {m['batch']}{why}. At a smaller "
                     'batch the fixed per-step costs weigh more, so the ratios are, if anything, pessimistic.')
    if m['device'].startswith('cpu'):
        lines.append('On a small shared CPU the spread of single network calls (min/max above) is larger than '
                     'the overhead being measured, so wall-time ratios below 1 and several percent above it are '
                     'noise; the non-network time is the precise figure here. On a busy machine, each small '
                     "multi-threaded op (the predictor's matrix products, the feature's channel mean) can also "
                     'wait for a descheduled worker of torch\'s thread pool; that, not arithmetic, is what makes '
                     'a predictor call take milliseconds when it does.')
    return '\n'.join(x for x in lines if x is not None) + '\n'


def markers(key):
    return f'<!-- overhead:{key}:start -->', f'<!-- overhead:{key}:end -->'


def write_section(path, body, key):
    """Put ``body`` between this benchmark's markers for ``key`` in ``path``, keeping everything
    else; a missing file is created, a missing section appended."""
    start, end = markers(key)
    section = f'{start}\n{body.rstrip()}\n{end}'
    text = ''
    if os.path.exists(path):
        with open(path, encoding='utf-8') as f:
            text = f.read()
    i, j = text.find(start), text.find(end)
    if i >= 0 and j > i:
        new = text[:i] + section + text[j + len(end):]
    elif i >= 0 or j >= 0:
        raise ValueError(f'{path}: unbalanced {start} / {end} markers; fix the file by hand')
    elif text.strip():
        new = text.rstrip('\n') + '\n\n' + section + '\n'
    else:
        new = ('# Benchmarks\n\nMeasured numbers written by the scripts in `benchmarks/`. Each script owns the '
               'text between its HTML comment markers and rewrites only that; edit anything else freely.\n\n'
               + section + '\n')
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    with open(path, 'w', encoding='utf-8') as f:
        f.write(new)


def command_line(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    script = os.path.relpath(os.path.abspath(__file__), ROOT)
    return shlex.join(['python', script, *argv])


# ----------------------------------------------------------------------------------------------
# Command line.

@click.command(context_settings=dict(show_default=True))
@click.option('--device', help='cpu or cuda (default: cuda when available)', type=click.Choice(['cpu', 'cuda']))
@click.option('--batch', help='Images per batch (default: 64 on cuda, 1 on cpu)', type=click.IntRange(min=1))
@click.option('--repeats', help='Timed runs per configuration (default: 10 on cuda, 3 on cpu)',
              type=click.IntRange(min=1))
@click.option('--warmup', help='Untimed runs per configuration first (default: 1 on cuda, 0 on cpu)',
              type=click.IntRange(min=0))
@click.option('--calls', help='Bare network calls timed before each timed run (default: 5 on cuda, 1 on cpu)',
              type=click.IntRange(min=1))
@click.option('--out', help='Markdown file to write the report into (its own section)', type=click.Path(dir_okay=False))
def main(device, batch, repeats, warmup, calls, out):
    """Time sampling runs against bare network calls: the overhead of solvers and the AMED predictor."""
    if device is None:
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device == 'cuda' and not torch.cuda.is_available():
        raise click.UsageError('--device cuda: no CUDA device is available')
    command = command_line()
    result = run_benchmark(device, batch, repeats, warmup, calls,
                           log=lambda msg: click.echo(msg, err=True))
    report = format_report(result, command)
    click.echo(report)
    if out:
        write_section(out, report, 'cuda' if device == 'cuda' else 'cpu')
        click.echo(f'wrote {out}', err=True)


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
