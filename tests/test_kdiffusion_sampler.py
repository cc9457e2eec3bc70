"""The k-diffusion-signature AMED sampler (integrations/kdiffusion.py) against k-diffusion itself,
against solvers.sample, and through a k-diffusion model wrapper."""

import pytest
import torch

import solver_utils
import solvers
from integrations import card as C
from integrations.kdiffusion import sample_amed
from models.toy import GaussianMixture
from tests.peers import k_diffusion_external, k_diffusion_sampling
from predictors.networks import AMEDPredictor


@pytest.fixture(scope='module')
def gmm():
    return GaussianMixture(seed=0)


def k_model(model):
    return lambda x, sigma, **kw: model(x, sigma)


def noise(n=3, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def predictor(seed=0):
    torch.manual_seed(seed)
    return AMEDPredictor(scale_dir=0.05, scale_time=0.2)


@pytest.mark.parametrize('student', ['dpm', 'amed'])
def test_half_r_with_unit_scales_is_k_diffusion_dpm_2(gmm, student):
    """r = 1/2 with both scales 1: the AMED step is k-diffusion's DPM-2 step, and the trailing 0 its
    final Euler step; the callback sees what k-diffusion's does."""
    kd = k_diffusion_sampling()
    sigmas = torch.cat([solver_utils.get_schedule(6, 0.002, 80.0, 'polynomial', 7.0).float(), torch.zeros(1)])
    z = noise() * sigmas[0]
    seen = {'ours': [], 'theirs': []}

    def record(key):
        return lambda d: seen[key].append((d['i'], float(d['sigma']), float(d['sigma_hat']), d['x'], d['denoised']))
    theirs = kd.sample_dpm_2(k_model(gmm), z, sigmas, disable=True, callback=record('theirs'))
    ours = sample_amed(k_model(gmm), z, sigmas, predictor=solvers.FixedPredictor(0.5), solver=student, disable=True,
                       callback=record('ours'))
    assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-5
    assert [s[:3] for s in seen['ours']] == [s[:3] for s in seen['theirs']] and len(seen['ours']) == 6
    for a, b in zip(seen['ours'], seen['theirs']):
        torch.testing.assert_close(a[3], b[3], rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(a[4], b[4], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize('student,opts', [('amed', {}), ('euler', {}), ('ipndm', dict(max_order=3)), ('dpm', {}),
                                          ('dpmpp', dict(max_order=3, predict_x0=True, thresholding=False))])
def test_equals_solvers_sample_on_the_built_in_model(gmm, student, opts):
    """A learned, feature-reading predictor (feature hooked on the model's module), with AFS."""
    t = solvers.get_model_schedule(gmm, 5, schedule_type='polynomial', schedule_rho=7.0)
    z = noise()
    pred = predictor()
    ref = solvers.sample(gmm, z, solver=student, t_steps=t, afs=True, predictor=pred, **opts)
    ours = sample_amed(k_model(gmm), z * float(t[0]), t, predictor=pred, feature_module=gmm.feature_module,
                       solver=student, afs=True, disable=True, **opts)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert not gmm.feature_module._forward_hooks
    # A trailing 0 adds the final Euler step to 0 = solvers.sample's denoise_to_zero.
    zero = sample_amed(k_model(gmm), z * float(t[0]), torch.cat([t, torch.zeros(1, dtype=t.dtype)]), predictor=pred,
                       feature_module=gmm.feature_module, solver=student, afs=True, disable=True, **opts)
    torch.testing.assert_close(zero, gmm(ref, torch.full([3], float(t[-1]))), rtol=0, atol=0)


def test_card_runs_on_its_sigmas(gmm):
    """A card (here from a learned predictor, zero feature) runs on its t_steps or its full sigmas,
    float32 as k-diffusion passes them, and equals solvers.sample with the card."""
    t = solvers.get_model_schedule(gmm, 4, schedule_type='polynomial', schedule_rho=7.0)
    spec, _ = solvers.prepare(gmm, 'ipndm', t_steps=t)
    values = C.static_steps(gmm, spec, t, predictor(1), True, feature='zero')
    card = C.build_card(gmm, spec, t, True, *values)
    z = noise()
    ref = solvers.sample(gmm, z, solver='ipndm', t_steps=card['t_steps'], afs=True, predictor=C.CardPredictor(card))
    for sigmas in (C.kdiffusion_sigmas(card, append_zero=False), torch.tensor(card['sigmas'])):
        out = sample_amed(k_model(gmm), z * float(t[0]), sigmas, card=card, disable=True)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match='sigmas do not match the solver card'):
        sample_amed(k_model(gmm), z, torch.tensor([80.0, 1.0, 0.002]), card=card)
    with pytest.raises(ValueError, match='max_order comes from the solver card'):
        sample_amed(k_model(gmm), z, C.kdiffusion_sigmas(card), card=card, max_order=2)
    with pytest.raises(ValueError, match='either a solver card or a predictor'):
        sample_amed(k_model(gmm), z, C.kdiffusion_sigmas(card))
    with pytest.raises(ValueError, match='pass feature_module'):
        sample_amed(k_model(gmm), z, t, predictor=predictor(), solver='euler')


class TinyEps(torch.nn.Module):
    """A tiny random epsilon network in the CompVis interface: ``apply_model(x, t, cond)`` and
    ``alphas_cumprod``; ``mid`` has an 8x8 output for the AMED feature."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = torch.nn.Conv2d(4, 16, 3, padding=1)
        self.mid = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.out = torch.nn.Conv2d(16, 4, 3, padding=1)
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        self.register_buffer('alphas_cumprod', torch.cumprod(1 - betas, 0).float())
        self.calls = 0

    def apply_model(self, x, t, cond):
        self.calls += 1
        h = torch.nn.functional.silu(self.inp(x) + (t.float() / 1000).reshape(-1, 1, 1, 1) + cond)
        return self.out(torch.nn.functional.silu(self.mid(h)))


def test_a_k_diffusion_model_wrapper_runs_through_it():
    """k_diffusion.external.CompVisDenoiser around a tiny random epsilon network, with a dynamic
    feature-reading predictor hooked on the network's module and the conditioning in extra_args."""
    ext = k_diffusion_external()
    net = TinyEps()
    wrapped = ext.CompVisDenoiser(net)
    sigmas = wrapped.get_sigmas(4)   # 4 levels from sigma_max, then 0
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * sigmas[0]
    steps = []
    kw = dict(extra_args={'cond': torch.full([2, 16, 1, 1], 0.3)}, disable=True, solver='ipndm', afs=True,
              callback=lambda d: steps.append(d['i']))
    out = sample_amed(wrapped, x, sigmas, predictor=predictor(), feature_module=net.mid, **kw)
    assert torch.isfinite(out).all() and steps == [0, 1, 2, 3]
    assert net.calls == solvers.count_nfe('ipndm', 4, True, True) + 1   # + the Euler step to 0
    assert not net.mid._forward_hooks
    # The feature matters: a predictor reading another module's output samples differently.
    other = sample_amed(wrapped, x, sigmas, predictor=predictor(), feature_module=net.inp, **kw)
    assert not torch.allclose(out, other)
    # The hook is removed when the model fails in the middle of the run.
    net.mid.register_forward_pre_hook(lambda m, i: (_ for _ in ()).throw(RuntimeError('boom')))
    with pytest.raises(RuntimeError, match='boom'):
        sample_amed(wrapped, x, sigmas, predictor=predictor(), feature_module=net.mid, **kw)
    assert not net.mid._forward_hooks


@pytest.mark.parametrize('doc,title', [('README.md', 'AMED in k-diffusion / ComfyUI'),
                                       ('docs/integrations.md', 'k-diffusion')])
def test_readme_snippet_runs(doc, title, tmp_path, monkeypatch, capsys, gmm, single_thread):
    """The k-diffusion example of README and docs, as written, on a card exported from a tiny trained
    predictor."""
    from click.testing import CliRunner

    from tests.readme import snippet
    from training.launch import plan_training, run_training
    monkeypatch.chdir(tmp_path)
    run_training(plan_training(dict(dataset_name='toy', sampler_stu='ipndm', sampler_tea='ipndm', M=2, afs=True,
                                    scale_time=0.2, num_steps=4, batch=8, total_kimg=0.016, tick_kimg=1), 'cpu'),
                 progress=False)
    result = CliRunner().invoke(C.main, ['export', '--predictor_path=0', '--out=card.json', '--seeds=0-7'])
    assert result.exit_code == 0, result.output
    capsys.readouterr()
    ns = {}
    exec(compile(snippet(title, doc), doc, 'exec'), ns)
    assert 'RMS difference of the card to its predictor: ' in capsys.readouterr().out
    card = ns['card']
    latents = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ref = solvers.sample(gmm, latents, predictor=C.CardPredictor(card), solver='ipndm', t_steps=card['t_steps'],
                         afs=True, max_order=4, denoise_to_zero=True)
    torch.testing.assert_close(ns['static'], ref, rtol=1e-6, atol=1e-6)
    assert 0 < (ns['static'] - ns['dynamic']).abs().max() < 0.5


def test_a_predictor_refuses_sigmas_it_was_not_trained_on(gmm, tmp_path, single_thread):
    """A trained predictor (4 polynomial levels) on 9 Karras sigmas: one line saying what it was
    trained on and what it got; foreign_sigmas='warn' runs them with that line as a warning. Its
    own schedule (with a trailing 0) runs."""
    import warnings

    from training.launch import plan_training, run_training
    run_dir, _ = run_training(plan_training(dict(dataset_name='toy', sampler_stu='ipndm', sampler_tea='ipndm', M=1,
                                                 afs=True, num_steps=4, batch=4, total_kimg=0.004, tick_kimg=1,
                                                 outdir=str(tmp_path / 'exps')), 'cpu'), progress=False)
    kd = k_diffusion_sampling()
    karras = kd.get_sigmas_karras(9, 0.002, 80.0)
    z = noise(1) * 80.0
    kw = dict(predictor=run_dir, feature_module=gmm.feature_module, disable=True)
    with pytest.raises(ValueError) as e:
        sample_amed(k_model(gmm), z, karras, **kw)
    message = str(e.value)
    assert message.startswith('the predictor was trained on 4 polynomial (rho 7) noise levels from 80 to 0.002; '
                              'these sigmas are 9 levels from 80 to 0.002') and '\n' not in message
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        out = sample_amed(k_model(gmm), z, karras, foreign_sigmas='warn', **kw)
    assert [str(w.message) for w in caught] == [message] and torch.isfinite(out).all()
    own = solvers.get_model_schedule(gmm, 4, schedule_type='polynomial', schedule_rho=7.0)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        sample_amed(k_model(gmm), z, torch.cat([own.float(), torch.zeros(1)]), **kw)


def test_a_tail_of_the_card_is_img2img(gmm):
    """A tail of the card's t_steps (C.tail_steps, denoise 0.5) from a noised image: the card's last
    intervals with the multistep history restarting and AFS off, as solvers.sample on that tail."""
    t = solvers.get_model_schedule(gmm, 5, schedule_type='polynomial', schedule_rho=7.0)
    spec, _ = solvers.prepare(gmm, 'ipndm', t_steps=t)
    card = C.build_card(gmm, spec, t, True, *C.static_steps(gmm, spec, t, predictor(2), True, feature='zero'))
    tail = C.tail_steps(card, 0.5)
    assert tail == card['t_steps'][2:] and C.tail_steps(card, 1.0) == card['t_steps']
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 0.5
    z = noise(2)
    ref = solvers.sample(gmm, z + image / tail[0], solver='ipndm', t_steps=tail, afs=False, max_order=4,
                         predictor=C.CardPredictor(card))
    out = sample_amed(k_model(gmm), image + z * tail[0], C.kdiffusion_sigmas(card, append_zero=False, denoise=0.5),
                      card=card, disable=True)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match='keeps no interval of the 4-interval solver card'):
        C.tail_steps(card, 0.1)


def test_readme_integration_examples_are_the_docs_ones():
    """README's short integration examples are docs/integrations.md's, word for word (both are run by
    the tests above and in test_comfyui / test_diffusers_scheduler)."""
    from tests.readme import snippet
    doc = 'docs/integrations.md'
    assert snippet('AMED in k-diffusion / ComfyUI') == snippet('k-diffusion', doc)
    assert snippet('AMED in diffusers') == snippet('diffusers: text to image', doc)
    readme_install = snippet('AMED in k-diffusion / ComfyUI', lang='bash').split('#')[0].strip()
    assert readme_install == snippet('ComfyUI', doc, lang='bash').strip()
