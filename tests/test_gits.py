"""GITS schedules (evaluation/gits.py), schedule cards and the comparison command (evaluation/compare.py)."""

import itertools
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import sample
import solvers
from evaluation import compare, gits
from evaluation.accuracy import seeded_inputs
from integrations.kdiffusion import sample_amed
from models.presets import load_model
from predictors import card as C

SMALL = dict(num_warmup=6, num_steps_tea=13, batch=3)


@pytest.fixture(scope='module')
def toy():
    return load_model('toy')


@pytest.fixture(scope='module')
def costs(toy):
    return {m: gits.cost_matrix(toy, metric=m, **SMALL) for m in gits.METRICS}


def test_dp_path_is_the_optimum_by_brute_force():
    rng = np.random.default_rng(0)
    n, k, coeff = 9, 3, 1.15
    cost = rng.uniform(0.1, 2.0, (n, n))

    def objective(path):
        return sum(cost[a, b] * coeff ** m for m, (a, b) in enumerate(zip(path[:-1], path[1:])))
    paths = [(0, *mid, n - 1) for mid in itertools.combinations(range(1, n - 1), k - 1)]
    best = min(paths, key=objective)
    assert tuple(gits.dp_path(cost, k, coeff)) == best
    assert gits.dp_path(cost, 1, coeff) == [0, n - 1]


def test_cost_matrix(costs):
    """The teacher (iPNDM) starts with an Euler step, so jumping to the next fine point costs nothing;
    every metric grows with the length of the first jump."""
    for metric, c in costs.items():
        m = c['cost']
        assert abs(float(m[0, 1])) < 1e-9, metric
        assert float(m[0, -1]) > float(m[0, 2]), metric
        assert c['seeds'] == list(range(200000, 200006))


def test_cost_entries_are_one_euler_step_from_the_teachers_point(toy, costs):
    """Every entry (i, j), recomputed from its definition in the official GITS search: the teacher's
    own trajectory on the fine grid (plain iPNDM, order 4), one Euler step with the model's direction
    at the teacher's point i, compared with the teacher's point j; per-sample values, batch mean.
    dev: distance from the line through the trajectory's first and last points, minus the teacher's
    (zero at the last point)."""
    t = torch.tensor(costs['dev']['t_fine'], dtype=torch.float64)
    latents, _ = seeded_inputs(toy, costs['dev']['seeds'])
    traj = solvers.sample(toy, latents.double(), solver='ipndm', t_steps=t, return_inters=True).flatten(2)
    n = len(t)
    start, end = traj[0], traj[-1]
    unit = (end - start) / (end - start).norm(dim=1, keepdim=True)

    def off_line(x):
        v = x - start
        return (v - (v * unit).sum(1, keepdim=True) * unit).norm(dim=1)
    for i, j in [(0, 1), (0, n - 1), (3, 7), (5, n - 1), (n - 2, n - 1)]:
        x = traj[i].reshape(latents.shape)
        d = ((x - toy(x, t[i])) / t[i]).flatten(1)
        step = traj[i] + (t[j] - t[i]) * d
        teacher_dev = off_line(traj[j]).mean() if j < n - 1 else 0.0
        expected = dict(l1=(step - traj[j]).abs().sum(1).mean(), l2=(step - traj[j]).norm(dim=1).mean(),
                        dev=off_line(step).mean() - teacher_dev)
        for metric, value in expected.items():
            assert float(costs[metric]['cost'][i, j]) == pytest.approx(float(value), rel=1e-9, abs=1e-9), (metric, i, j)


def test_deviation_of_points_on_and_off_the_line():
    start, end = torch.zeros(2, 3), torch.tensor([[1.0, 0, 0], [0, 2.0, 0]])
    points = torch.stack([0.5 * end, 0.5 * end + torch.tensor([[0, 3.0, 0], [0, 0, 4.0]])])
    assert torch.allclose(gits.deviation(points, start, end), torch.tensor([[0.0, 0.0], [3.0, 4.0]]))


@pytest.mark.parametrize('solver,nfe,afs,points', [('ipndm', 5, False, 6), ('ipndm', 5, True, 7), ('dpm', 4, False, 3),
                                                   ('unipc', 5, False, 6)])
def test_schedule_points_and_nfe(toy, costs, solver, nfe, afs, points):
    spec = solvers.make_solver(solver)
    t_steps, indices = gits.schedule_from_costs(toy, costs['dev'], spec, nfe, afs)
    assert len(t_steps) == points and indices[0] == 0 and indices[-1] == SMALL['num_steps_tea'] - 1
    assert all(a > b for a, b in zip(t_steps, t_steps[1:]))
    assert solvers.count_nfe(spec, len(t_steps), afs) == nfe


def test_gits_card_by_one_command_sampled_everywhere(tmp_path, toy):
    out = tmp_path / 'gits.json'
    res = CliRunner().invoke(gits.main, ['--dataset_name=toy', '--solver=ipndm', '--nfe=5', f'--out={out}',
                                         '--num_warmup=6', '--num_steps_tea=13', '--no-progress'])
    assert res.exit_code == 0, res.output
    card = C.load_card(str(out))
    assert C.is_schedule_card(card) and card['nfe'] == 5 and len(card['t_steps']) == 6
    prov = card['provenance']
    assert prov['method'] == 'gits' and prov['seeds'] == '200000-200005' and prov['coeff'] == 1.15
    assert prov['metric'] == 'dev' and len(prov['fine_grid']) == 13 and prov['search_seconds'] > 0
    # sample.py --card equals sample.py --t_steps with the same levels
    dirs = []
    for arg in (f'--card={out}', '--dataset_name=toy', ):
        d = tmp_path / f'run{len(dirs)}'
        extra = [] if arg.startswith('--card') else ['--solver=ipndm', '--t_steps=' + ','.join(map(repr, card['t_steps']))]
        res = CliRunner().invoke(sample.main, [arg, *extra, '--seeds=0-3', '--grid', f'--outdir={d}', '--no-progress'])
        assert res.exit_code == 0, res.output
        assert '(5 NFE, 6 time points' in res.output
        dirs.append(d)
    assert (dirs[0] / 'grid.png').read_bytes() == (dirs[1] / 'grid.png').read_bytes()
    # the k-diffusion sampler with the card's sigmas (and a trailing 0)
    z = torch.randn(2, *toy.img_shape, generator=torch.Generator().manual_seed(1))
    expected = solvers.sample(toy, z, solver='ipndm', t_steps=card['t_steps'])
    got = sample_amed(lambda x, s: toy(x, s), z * card['t_steps'][0], C.kdiffusion_sigmas(card, append_zero=False),
                      card=str(out), disable=True)
    assert torch.allclose(got, expected, rtol=0, atol=1e-5)


def test_schedule_card_is_validated(tmp_path, toy):
    spec, t_steps = solvers.prepare(toy, 'unipc', num_steps=5)
    card = C.build_card(toy, spec, t_steps, afs=True)
    assert card['query_sigmas'] == card['sigmas'][1:-1] and card['nfe'] == 3
    C.load_card(card)
    bad = dict(card, query_sigmas=card['sigmas'][:-1])
    with pytest.raises(ValueError, match='query_sigmas'):
        C.load_card(bad)
    with pytest.raises(ValueError, match='plain solver'):
        C.load_card(dict(card, solver='amed'))


def test_gits_refuses_an_impossible_nfe(tmp_path):
    out = tmp_path / 'x.json'
    res = CliRunner().invoke(gits.main, ['--dataset_name=toy', '--solver=dpm', '--nfe=3', f'--out={out}'])
    assert res.exit_code != 0 and 'NFE 3' in res.output and not out.exists()


def test_compare_every_method_with_training_seeds(tmp_path, toy, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = compare.run(toy, 'toy', nfes=(5,), seeds=range(4), train_seeds=(0, 1), kimg=0.004, train_batch=4,
                         gits_options=dict(num_warmup=4, num_steps_tea=13), log=lambda s: None)
    labels = [label for label, _ in compare.PLAIN + compare.GITS + compare.LEARNED]
    assert list(result['results']) == labels
    for label in labels:
        s = result['results'][label]['5']['rms']
        assert s['min'] <= s['mean'] <= s['max'] and np.isfinite(s['mean'])
        assert len(s['values']) == (2 if label in dict(compare.LEARNED) else 1)
    assert result['info']['eval_seeds'] == '0-3' and result['info']['train_seeds'] == [0, 1]
    assert result['info']['gits']['seeds'] == '200000-200003'
    text = compare.table(result)
    assert 'AMED-Solver' in text and 'iPNDM + GITS' in text
    assert compare.plot(result, str(tmp_path / 'p.png')) and (tmp_path / 'p.png').stat().st_size > 1000


def test_compare_command_writes_json(tmp_path):
    out = tmp_path / 'c.json'
    res = CliRunner().invoke(compare.main, ['--dataset_name=toy', '--methods=plain,gits', '--nfe=3', '--seeds=0-1',
                                            '--num_warmup=2', '--num_steps_tea=9', '--coeff=1.0', f'--out={out}'])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert set(data['results']) == {label for label, _ in compare.PLAIN + compare.GITS}
    assert data['info']['gits']['coeff'] == 1.0 and data['info']['gits']['num_steps_tea'] == 9
    assert data['command'].startswith('python -m evaluation.compare')
    res = CliRunner().invoke(compare.main, ['--dataset_name=toy', '--metrics=fid9', f'--out={tmp_path}/y.json'])
    assert res.exit_code != 0 and 'fid9' in res.output and not (tmp_path / 'y.json').exists()


@pytest.mark.parametrize('solver,afs', [('ipndm', False), ('ipndm', True), ('deis', True)])
def test_schedule_card_in_the_diffusers_scheduler(toy, solver, afs):
    """A schedule card run by AMEDScheduler step by step, as a pipeline does, equals solvers.sample on
    the same VP epsilon network (the analytic model behind the scheduler's alphas_cumprod)."""
    pytest.importorskip('diffusers')
    from integrations.diffusers_scheduler import AMEDScheduler
    from models.latent import DiscreteEpsDenoiser

    class ToyEps(DiscreteEpsDenoiser):
        def eps(self, x_in, timestep, cond):
            sigma = self.t_to_sigma((timestep.double() + 1) / self.num_timesteps).reshape(-1, 1, 1, 1)
            x = x_in.double() * (sigma ** 2 + 1).sqrt()
            return ((x - toy(x, sigma.reshape(-1))) / sigma).float()

    probe = AMEDScheduler()
    net = ToyEps(torch.exp(2 * probe.maps._keypoints(torch.device('cpu'))[1]))
    spec, t_steps = solvers.prepare(net, solver, num_steps=6, schedule_type='logsnr')
    card = C.build_card(net, spec, t_steps, afs)
    sched = AMEDScheduler(card=card)
    sched.set_timesteps(sched.num_steps)
    assert sched.num_steps == card['nfe'] == 5 - int(afs)
    z = torch.randn(2, *toy.img_shape, generator=torch.Generator().manual_seed(3))
    x = z * sched.init_noise_sigma
    for t in sched.timesteps:
        eps = net.eps(sched.scale_model_input(x, t), t.reshape(1).expand(2), None)
        x = sched.step(eps, t, x).prev_sample
    expected = solvers.sample(net, z, solver=spec, t_steps=t_steps, afs=afs)
    assert torch.allclose(x, expected.float(), rtol=0, atol=1e-4 * float(expected.abs().max()))
    unipc, t_u = solvers.prepare(net, 'unipc', num_steps=5)
    with pytest.raises(ValueError, match='corrector'):
        AMEDScheduler(card=C.build_card(net, unipc, t_u, False))
