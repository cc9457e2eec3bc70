"""How good a stand-in for a real image network a built-in learned model (``toy_unet``, or with
``--model=photo_unet`` the model of photographs) is: the quality tables of docs/findings.md and
docs/photo_unet.md.

    python benchmarks/toy_unet_quality.py --out=docs/toy_unet/quality.json
    python benchmarks/toy_unet_quality.py --model=photo_unet --num=16 --fd_num=2000 --kimg=0 --out=docs/photo_unet/quality.json

Parts 3 (the exact denoiser exists for toy_unet only) and 5 (``--kimg=0``) can be left out; FD
compares with the model's training data (exact mixture samples, or crops of the training photographs).

Measures, on the shipped checkpoint (seeds as in benchmarks/loss_study.py: EVALUATION seeds
100000-100063 for per-sample errors, 300000-... for the FD samples, exact data sets 7 and 8):

1. cost: one network call at batch 64, and the reference solution of 64 samples;
2. the reference's convergence: the relative change of the final state when its RK4 steps are doubled;
3. the denoiser's error against the exact analytic denoiser at several sigma, next to the exact
   denoiser's own error (the part no network can remove);
4. FD-pixel8 of ``--fd_num`` samples against exact data, next to the FD between two sets of exact
   data (the noise floor); the samples come from ``--fd_solver`` (a high-NFE solver), whose RMS
   distance to the reference solution is reported beside it;
5. the NFE-5 error to the reference solution of the plain solvers and of AMED (official recipes,
   interval loss), on toy_unet and, with the same seeds and recipes, on the analytic model.
"""

import json
import os
import sys
import tempfile
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.loss_study import FD_DATA_SEEDS  # noqa: E402
from evaluation import accuracy  # noqa: E402
from metrics import frechet  # noqa: E402
from models.presets import load_model, training_data  # noqa: E402
from torch_utils import distributed as dist  # noqa: E402
from predictors.settings import SolverSettings  # noqa: E402

EVAL_SEEDS = range(100000, 100064)
FD_SEED0 = 300000
SIGMAS = (0.002, 0.02, 0.1, 0.5, 1.0, 2.0, 10.0, 80.0)
#: The paper's CIFAR-10 FID at NFE 5 (the official README).
PAPER_CIFAR10 = {'AMED-Plugin (iPNDM)': 6.61, 'AMED-Solver': 7.59, 'iPNDM': 13.59, 'DPM-Solver++(3M)': 24.97,
                 'Euler': 49.66, 'DPM-Solver-2': 57.30}


def rel_change(a, b):
    """Per-sample relative L2 distance |a - b| / |b|."""
    return (a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)


def rms(a, b):
    return (a.double() - b.double()).square().mean().sqrt().item()


def fd_solver_kwargs(spec):
    """'ipndm:21' -> iPNDM order 4 on polynomial rho 7 with 21 time points (NFE 20)."""
    name, _, steps = spec.partition(':')
    kw = dict(accuracy.BASELINES)[{'ipndm': 'iPNDM', 'dpmpp': 'DPM-Solver++(3M)', 'euler': 'Euler',
                                   'dpm': 'DPM-Solver-2'}[name]]
    return dict(kw, num_steps=int(steps))


@click.command(context_settings=dict(show_default=True))
@click.option('--model', 'dataset_name', type=click.Choice(['toy_unet', 'photo_unet']), default='toy_unet')
@click.option('--num', type=click.IntRange(2, len(EVAL_SEEDS)), default=len(EVAL_SEEDS),
              help='evaluation samples of the reference and its convergence')
@click.option('--fd_num', type=int, default=10000, help='samples for FD-pixel8 and FD-spectrum')
@click.option('--fd_solver', default='ipndm:21', help='solver:num_steps of the FD samples')
@click.option('--kimg', type=float, default=2.0, help='AMED training trajectories (thousands), batch 32; 0: no NFE-5 part')
@click.option('--out', type=str, help='write the results as JSON here')
def main(dataset_name, num, fd_num, fd_solver, kimg, out):
    """Measure a built-in U-Net's cost, reference convergence, denoiser error, FD and NFE-5 ordering."""
    dist.init('cpu')
    res = dict(command='python benchmarks/toy_unet_quality.py ' + ' '.join(sys.argv[1:]), torch_threads=torch.get_num_threads())
    net = load_model(dataset_name)
    exact_model = load_model('toy')

    def save():
        if out:
            os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
            with open(out, 'wt') as f:
                json.dump(res, f, indent=1)

    # 1-2. Cost and the reference's convergence.
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        net(x, torch.full((64,), 1.0))
        times = []
        for _ in range(5):
            t0 = time.time()
            net(x, torch.full((64,), 1.0))
            times.append(time.time() - t0)
    res['call_batch64_s'] = sorted(times)[2]
    latents, cond = accuracy.seeded_inputs(net, EVAL_SEEDS[:num])
    t0 = time.time()
    ref = accuracy.exact_solution(net, latents, net.sigma_max, net.sigma_min)
    res[f'reference_{num}_s'] = time.time() - t0
    steps = net.steps_per_unit
    fine = accuracy.exact_solution(net, latents, net.sigma_max, net.sigma_min, steps_per_unit=2 * steps)
    half = accuracy.exact_solution(net, latents, net.sigma_max, net.sigma_min, steps_per_unit=steps // 2)
    res['reference'] = dict(steps_per_unit=steps, doubled_max=rel_change(ref, fine).max().item(),
                            doubled_median=rel_change(ref, fine).median().item(),
                            halved_max=rel_change(half, fine).max().item())
    print(f"network call, batch 64: {res['call_batch64_s']:.3f} s; reference of {num} samples: "
          f"{res[f'reference_{num}_s']:.1f} s; {res['reference']}", flush=True)
    save()

    # 3. Denoiser error against the exact one.
    res['denoiser'] = []
    g = torch.Generator().manual_seed(11)
    x0 = exact_model.sample(512, generator=g)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        for sigma in SIGMAS if dataset_name == 'toy_unet' else ():
            s = torch.full((len(x0),), sigma, dtype=torch.float64)
            xn = x0 + sigma * noise
            d_exact = exact_model(xn, s)
            d_net = torch.cat([net(xn[i:i + 128].float(), s[i:i + 128].float()).double() for i in range(0, 512, 128)])
            row = dict(sigma=sigma, net_vs_exact=rms(d_net, d_exact), exact_vs_data=rms(d_exact, x0),
                       relative=rms(d_net, d_exact) / d_exact.square().mean().sqrt().item())
            res['denoiser'].append(row)
            print(row, flush=True)
    save()

    # 4. FD-pixel8 and FD-spectrum against the training data.
    source = training_data(dataset_name)
    data = [source.sample(fd_num, generator=torch.Generator().manual_seed(s)).float() for s in FD_DATA_SEEDS]
    kw = fd_solver_kwargs(fd_solver)
    fd_latents, _ = accuracy.seeded_inputs(net, range(FD_SEED0, FD_SEED0 + fd_num))
    t0 = time.time()
    samples = accuracy.sample_all(net, fd_latents, batch=256, **kw)
    res['fd'] = dict(num=fd_num, solver=fd_solver, seconds=time.time() - t0,
                     solver_rms_to_reference=accuracy.solver_error(net, latents, ref, **kw))
    for metric in ('pixel', 'spectrum'):
        stats = frechet.image_stats(data[0], metric)
        res['fd'][metric] = {dataset_name: frechet.image_fd(samples, stats, metric),
                             'noise_floor': frechet.image_fd(data[1], stats, metric)}
    print(res['fd'], flush=True)
    save()
    if not kimg:
        return

    # 5. NFE-5 ordering on both models.
    res['nfe5'] = {}
    for name, model in ((dataset_name, net), ('toy', exact_model)):
        lat, c, exact = (latents, None, ref) if name == dataset_name else accuracy.reference_set(model, EVAL_SEEDS[:num])
        rows = {}
        for label, kwargs in accuracy.BASELINES:
            num_steps = accuracy.steps_for_nfe(kwargs['solver'], 5, afs=True, with_predictor=False)
            rows[label] = accuracy.solver_error(model, lat, exact, c, num_steps=num_steps, afs=True, **kwargs)
        with tempfile.TemporaryDirectory() as tmp:
            for recipe in ('amed', 'ipndm'):
                t0 = time.time()
                _, predictor, settings = accuracy.train_recipe(accuracy.AMED_RECIPES[recipe], 5, dataset_name=name,
                                                               batch=32, total_kimg=kimg, tick_kimg=kimg, outdir=tmp)
                label = accuracy.AMED_LABELS[recipe]
                rows[label] = accuracy.solver_error(model, lat, exact, c, predictor=predictor,
                                                    **SolverSettings.from_dict(settings).sample_kwargs())
                print(f'{name} {label}: {rows[label]:.4f} (trained in {time.time() - t0:.0f} s)', flush=True)
        res['nfe5'][name] = rows
        print(name, rows, flush=True)
        save()

    # The tables.
    print('\n| sigma | RMS(D_net - D_exact) | relative to RMS(D_exact) | RMS(D_exact - x0) |\n|---|---|---|---|')
    for r in res['denoiser']:
        print(f"| {r['sigma']:g} | {r['net_vs_exact']:.4f} | {r['relative']:.4f} | {r['exact_vs_data']:.4f} |")
    order = sorted(PAPER_CIFAR10, key=PAPER_CIFAR10.get)
    print(f'\n| NFE 5 | {dataset_name}: RMS error to reference | toy: RMS error to exact | CIFAR-10 FID (paper) |\n|---|---|---|---|')
    for label in order:
        print(f"| {label} | {res['nfe5'][dataset_name][label]:.4f} | {res['nfe5']['toy'][label]:.4f} | {PAPER_CIFAR10[label]} |")


if __name__ == '__main__':
    main()
