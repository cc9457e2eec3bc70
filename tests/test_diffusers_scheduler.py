"""The diffusers scheduler (integrations/diffusers_scheduler.py) in a tiny random
StableDiffusionPipeline with classifier-free guidance: equal to sample.py --card, equal to the
official plugin's rule, save/reload, and its errors."""

import math
import os

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

pytest.importorskip('diffusers')
pytest.importorskip('transformers')

from tests import latent_fixtures as F  # noqa: E402
import sample  # noqa: E402
import solvers  # noqa: E402
from integrations import card as C  # noqa: E402
from integrations.diffusers_scheduler import AMEDScheduler  # noqa: E402
from models.presets import load_model  # noqa: E402
from torch_utils.misc import StackedRandomGenerator  # noqa: E402
from training.launch import plan_training, run_training  # noqa: E402

PROMPT = 'a red cat'
RATE = 7.5


@pytest.fixture(scope='module')
def sd(tmp_path_factory, single_thread):
    """A tiny SD folder, the model as sample.py loads it, and a card exported from a predictor trained
    there with the official SD recipe (DPM-Solver(2M) noise prediction, AFS, scale_time) at toy size."""
    root = tmp_path_factory.mktemp('sched')
    folder = F.write_sd_folder(str(root / 'sd'))
    model = load_model('ms_coco', folder, 'cfg', RATE, prompt=PROMPT)
    plan = plan_training(dict(dataset_name='ms_coco', model_path=folder, prompt=PROMPT, guidance_type='cfg',
                              guidance_rate=RATE, sampler_stu='dpmpp', sampler_tea='dpmpp', num_steps=4, M=2, afs=True,
                              scale_dir=0.05, scale_time=0.2, schedule_type='discrete', schedule_rho=1.0, max_order=2,
                              predict_x0=False, lower_order_final=True, batch=2, total_kimg=0.002, tick_kimg=1,
                              outdir=str(root / 'exps')), 'cpu')
    run_dir, _ = run_training(plan, progress=False)
    card = C.export_card(run_dir, seeds='0-1', model=model)
    C.save_card(card, str(root / 'card.json'))
    return dict(root=root, folder=folder, model=model, card=card, card_path=str(root / 'card.json'))


def pipeline(model, scheduler):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.tokenizer.model_max_length = model.max_length
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, latents, output_type='latent', **kw):
    kw.setdefault('num_inference_steps', pipe.scheduler.num_steps)
    return pipe([PROMPT] * len(latents), latents=latents, guidance_scale=RATE, output_type=output_type,
                height=32, width=32, **kw).images


def seeds_latents(seeds):
    return StackedRandomGenerator('cpu', seeds).randn([len(seeds), 4, 16, 16])


def card_kwargs(card):
    keys = ('solver', 't_steps', 'afs', 'max_order', 'predict_x0', 'lower_order_final', 'thresholding')
    return {k: v for k, v in C.card_settings(card).items() if k in keys}


def test_pipeline_equals_sample_py(sd, tmp_path, monkeypatch):
    """The pipeline with the scheduler samples what sample.py --card does, one guided U-Net call per step."""
    model, card = sd['model'], sd['card']
    pipe = pipeline(model, AMEDScheduler.from_config(pipe_config(), card=sd['card_path']))
    calls = []
    handle = model.unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    z = seeds_latents([0, 1])
    try:
        latents = run(pipe, z)
    finally:
        handle.remove()
    assert calls == [4] * card['evaluations'] and card['evaluations'] * 2 == card['nfe'] == 10
    ref = solvers.sample(model, z, model.encode_prompts([PROMPT] * 2, 'cpu'), predictor=C.CardPredictor(card),
                         **card_kwargs(card))
    torch.testing.assert_close(latents, ref, rtol=1e-5, atol=1e-5)
    # sample.py --card, PNG for PNG (quantisation: ours x*127.5+128 truncated, the pipeline's (x/2+0.5) in [0, 1]).
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(sample.main, [f"--card={sd['card_path']}", f"--model_path={sd['folder']}",
                                              f'--prompt={PROMPT}', '--seeds=0-1', '--outdir=out', '--no-progress'])
    assert result.exit_code == 0, result.output
    images = run(pipe, z, output_type='np')
    for seed in (0, 1):
        png = np.asarray(PIL.Image.open(f'out/000000/{seed:06d}.png')).astype(int)
        assert np.abs(np.round(images[seed] * 255).astype(int) - png).max() <= 1


def pipe_config():
    from diffusers import DDPMScheduler
    return DDPMScheduler(beta_start=F.SD_BETAS[0], beta_end=F.SD_BETAS[1], beta_schedule='scaled_linear').config


def official_rule(model, card, z):
    """The official diffusers plugin's rule, written independently in the VP form of diffusers'
    multistep DPM-Solver: the card's sigmas (inserted points included) are the grid, each point's
    model output is the guided eps at its timestep, and scale_dir multiplies the model terms of the
    step leaving an inserted point; orders 1, 2, ..., 2, 1 (lower_order_final)."""
    sig = card['sigmas']
    opts = card['solver_options']
    cond = model.encode_prompts([PROMPT] * len(z), 'cpu')
    uncond = model.encode_prompts([''] * len(z), 'cpu')
    alpha = lambda s: 1 / math.sqrt(1 + s * s)  # noqa: E731
    sig_vp = lambda s: s / math.sqrt(1 + s * s)  # noqa: E731
    x = (z * sig[0] * alpha(sig[0])).double()    # the VP latent
    history = []
    for j in range(len(sig) - 1):
        timestep = model.timestep(torch.tensor(sig[j], dtype=torch.float64)).float().expand(2 * len(z))
        with torch.no_grad():
            eps_u, eps_c = model.unet(torch.cat([x, x]).float(), timestep,
                                      encoder_hidden_states=torch.cat([uncond, cond])).sample.double().chunk(2)
        eps = eps_u + RATE * (eps_c - eps_u)
        m = eps if not opts['predict_x0'] else (x - sig_vp(sig[j]) * eps) / alpha(sig[j])
        history.insert(0, (-math.log(sig[j]), m))
        step_cur, total = j + 1, len(sig)
        order = step_cur if step_cur < opts['max_order'] else min(opts['max_order'], total - step_cur)
        c = card['scale_dir'][j // 2] if j % 2 else 1.0
        t = sig[j + 1]
        h = -math.log(t) - history[0][0]
        terms = history[0][1]
        if order == 2:
            r0 = (history[0][0] - history[1][0]) / h
            terms = terms + 0.5 * (history[0][1] - history[1][1]) / r0
        if opts['predict_x0']:
            x = (sig_vp(t) / sig_vp(sig[j])) * x - c * alpha(t) * math.expm1(-h) * terms
        else:
            x = (alpha(t) / alpha(sig[j])) * x - c * sig_vp(t) * math.expm1(h) * terms
    return (x / alpha(sig[-1])).float()


@pytest.mark.parametrize('predict_x0', [False, True])
def test_static_dpm_solver_path_is_the_official_rule(sd, predict_x0):
    model = sd['model']
    t = solvers.get_model_schedule(model, 4, schedule_type='discrete', schedule_rho=1.0)
    spec, _ = solvers.prepare(model, 'dpmpp', t_steps=t, max_order=2, predict_x0=predict_x0, lower_order_final=True,
                              thresholding=False)
    card = C.build_card(model, spec, t, False, r=[0.45, 0.6, 0.5], scale_dir=[1.04, 0.97, 1.02],
                        scale_time=[1.0, 1.0, 1.0])
    pipe = pipeline(model, AMEDScheduler.from_config(pipe_config(), card=card))
    z = seeds_latents([3, 4])
    out = run(pipe, z)
    ref = official_rule(model, card, z)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # scale_dir matters: the same card with unit scales samples something else.
    plain = pipeline(model, AMEDScheduler.from_config(pipe_config(), card=dict(card, scale_dir=[1.0] * 3)))
    assert (run(plain, z) - out).abs().max() > 1e-3


def test_save_and_reload_keep_the_card(sd, tmp_path):
    scheduler = AMEDScheduler.from_config(pipe_config(), card=sd['card_path'])
    scheduler.save_pretrained(str(tmp_path / 'scheduler'))
    again = AMEDScheduler.from_pretrained(str(tmp_path / 'scheduler'))
    assert again.config.card == sd['card'] and again.config.beta_schedule == 'scaled_linear'
    z = seeds_latents([2])
    torch.testing.assert_close(run(pipeline(sd['model'], again), z), run(pipeline(sd['model'], scheduler), z),
                               rtol=0, atol=0)


def test_timesteps_and_sigmas_arguments(sd):
    """The pipeline's timesteps=/sigmas= pass its signature checks; they must be the card's own."""
    model, card = sd['model'], sd['card']
    pipe = pipeline(model, AMEDScheduler.from_config(pipe_config(), card=card))
    z = seeds_latents([0])
    ref = run(pipe, z)
    ts = pipe.scheduler.timesteps.tolist()
    assert ts == model.timestep(torch.tensor(card['query_sigmas']).double()).float().tolist()
    for kw in (dict(timesteps=ts), dict(sigmas=card['sigmas'] + [0.0]), dict(sigmas=card['t_steps'])):
        torch.testing.assert_close(run(pipe, z, num_inference_steps=None, **kw), ref, rtol=0, atol=0)
    for kw, message in ((dict(num_inference_steps=50), 'the solver card runs 5 U-Net steps (NFE 10): pass '
                                                       'num_inference_steps=5 or leave it out, not 50'),
                        (dict(num_inference_steps=None, timesteps=[999, 500, 1]), "timesteps= must be the solver card's"),
                        (dict(num_inference_steps=None, sigmas=[14.6, 1.0, 0.03]), "sigmas= must be the solver card's")):
        with pytest.raises(ValueError) as e:
            run(pipe, z, **kw)
        assert message in str(e.value) and '\n' not in str(e.value)


def test_scheduler_errors_are_one_line(sd):
    with pytest.raises(ValueError, match='needs a solver card'):
        AMEDScheduler().set_timesteps(5)
    with pytest.raises(ValueError, match='epsilon-prediction'):
        AMEDScheduler(card=sd['card'], prediction_type='v_prediction')
    from models.toy import GaussianMixture
    toy = GaussianMixture(seed=0)
    spec, t = solvers.prepare(toy, 'euler', num_steps=3)
    toy_card = C.build_card(toy, spec, t, False, [0.5, 0.5], [1.0, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="made for a model with sigma_min 0.002; this scheduler's noise schedule"):
        AMEDScheduler(card=toy_card)
    scheduler = AMEDScheduler(card=sd['card'])
    with pytest.raises(ValueError, match='call set_timesteps'):
        scheduler.step(torch.zeros(1, 4, 16, 16), 0, torch.zeros(1, 4, 16, 16))


def test_readme_snippet_runs(sd, tmp_path, monkeypatch):
    """README's diffusers snippet, as written, with the tiny pipeline in place of the model id."""
    import json
    import shutil

    from tests.readme import snippet
    from generation.generate import to_uint8
    from transformers import CLIPTokenizer
    folder = str(tmp_path / 'tiny-sd')
    shutil.copytree(sd['folder'], folder)
    index = {'_class_name': 'StableDiffusionPipeline', 'requires_safety_checker': False,
             'safety_checker': [None, None], 'feature_extractor': [None, None],
             'scheduler': ['diffusers', 'DDPMScheduler'], 'text_encoder': ['transformers', 'CLIPTextModel'],
             'tokenizer': ['transformers', 'CLIPTokenizer'], 'unet': ['diffusers', 'UNet2DConditionModel'],
             'vae': ['diffusers', 'AutoencoderKL']}
    with open(os.path.join(folder, 'model_index.json'), 'w') as f:
        json.dump(index, f)
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder='tokenizer')
    tokenizer.model_max_length = sd['model'].max_length
    tokenizer.save_pretrained(os.path.join(folder, 'tokenizer'))
    monkeypatch.chdir(tmp_path)
    C.save_card(sd['card'], 'card.json')
    code = snippet('AMED in diffusers')
    assert "'stable-diffusion-v1-5/stable-diffusion-v1-5'" in code
    exec(compile(code.replace("'stable-diffusion-v1-5/stable-diffusion-v1-5'", repr(folder)), 'README.md', 'exec'), {})
    png = np.asarray(PIL.Image.open('astronaut.png')).astype(int)
    model = sd['model']
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = model.encode_prompts(['a photograph of an astronaut riding a horse'], 'cpu')
    x = solvers.sample(model, z, cond, predictor=C.CardPredictor(sd['card']), **card_kwargs(sd['card']))
    assert np.abs(to_uint8(model.decode(x))[0].astype(int) - png).max() <= 1
