"""The diffusers scheduler (integrations/diffusers_scheduler.py) in a tiny random
StableDiffusionPipeline with classifier-free guidance: equal to sample.py --card, equal to the
official plugin's rule, save/reload, and its errors."""

import contextlib
import json
import logging
import math
import os
import re

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
from integrations.diffusers_scheduler import CONFIG_KEY, AMEDScheduler, card_digest, config_card  # noqa: E402
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


@contextlib.contextmanager
def diffusers_log():
    """The lines diffusers logs (warnings and above) while the block runs."""
    lines = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger('diffusers')
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


def absolute_paths(folder):
    """Every string in the folder's text files that names an absolute path (or a home folder)."""
    found = []
    for root, _, files in os.walk(folder):
        for name in files:
            if name.endswith(('.json', '.txt')):
                text = open(os.path.join(root, name), encoding='utf-8').read()
                found += [(name, m) for m in re.findall(r'"((?:/|[A-Za-z]:\\\\|~/)[^"]*)"', text)]
    return found


def test_save_and_reload_keep_the_card(sd, tmp_path):
    """The config keeps what sampling needs and a provenance digest (no paths, no training options);
    reloading logs nothing and samples the same."""
    with diffusers_log() as log:
        scheduler = AMEDScheduler.from_config(pipe_config(), card=sd['card_path'])
        scheduler.save_pretrained(str(tmp_path / 'scheduler'))
        again = AMEDScheduler.from_pretrained(str(tmp_path / 'scheduler'))
    assert log == []
    with open(tmp_path / 'scheduler' / 'scheduler_config.json') as f:
        saved = json.load(f)
    kept = saved[CONFIG_KEY]
    assert kept == config_card(sd['card']) == again.card and C.load_card(kept)
    assert kept['provenance'] == dict(card_sha256=card_digest(sd['card']),
                                      predictor_sha256=sd['card']['provenance']['predictor_sha256'])
    assert 'model_path' not in kept['model'] and str(tmp_path).split(os.sep)[1] not in json.dumps(saved)
    assert len(json.dumps(saved)) < len(json.dumps(sd['card'])) / 2
    assert again.config.beta_schedule == 'scaled_linear' and absolute_paths(tmp_path / 'scheduler') == []
    z = seeds_latents([2])
    torch.testing.assert_close(run(pipeline(sd['model'], again), z), run(pipeline(sd['model'], scheduler), z),
                               rtol=0, atol=0)


def test_a_saved_pipeline_has_no_absolute_path_and_reloads(sd, tmp_path):
    """pipe.save_pretrained: the folder one would push holds no absolute path in any text file, and
    from_pretrained brings the pipeline back with the card scheduler, sampling the same."""
    from diffusers import StableDiffusionPipeline
    model = sd['model']
    unet, vae, text = F.sd_components(0)    # the folder's weights, not loaded from a path (diffusers would
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=model.tokenizer, unet=unet,  # record it)
                                   scheduler=AMEDScheduler.from_config(pipe_config(), card=sd['card_path']),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    folder = tmp_path / 'push'
    pipe.save_pretrained(str(folder))
    assert absolute_paths(folder) == []
    with diffusers_log() as log:
        again = StableDiffusionPipeline.from_pretrained(str(folder), low_cpu_mem_usage=False)
    assert log == [] and isinstance(again.scheduler, AMEDScheduler)
    again.set_progress_bar_config(disable=True)
    again.tokenizer.model_max_length = sd['model'].max_length
    z = seeds_latents([1])
    torch.testing.assert_close(run(again, z), run(pipe, z), rtol=1e-6, atol=1e-6)


def test_from_config_to_and_from_dpm_solver(sd):
    """diffusers' way of swapping schedulers, both ways, logs nothing; the card rides along."""
    from diffusers import DPMSolverMultistepScheduler
    with diffusers_log() as log:
        amed = AMEDScheduler.from_config(DPMSolverMultistepScheduler.from_config(pipe_config()).config,
                                         card=sd['card'])
        dpm = DPMSolverMultistepScheduler.from_config(amed.config)
        back = AMEDScheduler.from_config(dpm.config)
    assert log == []
    assert dpm.config.beta_schedule == 'scaled_linear' and back.card == amed.card == config_card(sd['card'])
    assert 'DPMSolverMultistepScheduler' in [c.__name__ for c in amed.compatibles]


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
    for kw, message in ((dict(num_inference_steps=50), 'the solver card runs 5 U-Net steps (NFE 10), not '
                                                       'num_inference_steps=50: pass num_inference_steps=5'),
                        (dict(num_inference_steps=50), 'pipelines pass their own default (50) when it is left out'),
                        (dict(num_inference_steps=None, timesteps=[999, 500, 1]), "timesteps= must be the solver card's"),
                        (dict(num_inference_steps=None, sigmas=[14.6, 1.0, 0.03]), "sigmas= must be the solver card's")):
        with pytest.raises(ValueError) as e:
            run(pipe, z, **kw)
        assert message in str(e.value) and '\n' not in str(e.value)


def test_img2img_runs_a_tail_of_the_card(sd):
    """StableDiffusionImg2ImgPipeline, strength 0.8 on a 5-step card: the pipeline starts at step 1 (the
    card's interval 1, set_begin_index), add_noise puts the image at t_1, and the run is the card's
    last intervals with AFS off, as solvers.sample on that tail. A strength that would start inside an
    interval is one clear error."""
    from diffusers import StableDiffusionImg2ImgPipeline
    model, card = sd['model'], sd['card']
    parts = pipeline(model, AMEDScheduler.from_config(pipe_config(), card=card)).components
    pipe = StableDiffusionImg2ImgPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    image = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(9))   # 4 channels: taken as latents
    calls = []
    handle = model.unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        out = pipe([PROMPT] * 2, image=image, strength=0.8, guidance_scale=RATE, num_inference_steps=5,
                   output_type='latent', generator=torch.Generator().manual_seed(0)).images
    finally:
        handle.remove()
    sched = pipe.scheduler
    assert sched.begin_index == 1 and sched.step_index == 5 and len(calls) == 4
    noise = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    tail = card['t_steps'][1:]
    ref = solvers.sample(model, noise + image / tail[0], model.encode_prompts([PROMPT] * 2, 'cpu'),
                         predictor=C.CardPredictor(card), **dict(card_kwargs(card), t_steps=tail, afs=False))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)   # the pipeline noises with float32 sigmas
    with pytest.raises(ValueError) as e:
        pipe([PROMPT], image=image[:1], strength=0.6, guidance_scale=RATE, num_inference_steps=5, output_type='latent')
    assert ('img2img would start at pipeline step 2 of the solver card\'s 5, inside one of its intervals (strength '
            '0.6): choose a strength that starts on an interval (0.4, 0.8, or 1)') in str(e.value)


def test_diffusers_conventions(sd):
    """sigmas (the level of the latent at each step, then the last), step_index, add_noise, and the
    pipeline's default step count refused with a message that says what happened."""
    card = sd['card']
    sched = AMEDScheduler.from_config(pipe_config(), card=card)
    sched.set_timesteps(5)
    s = card['sigmas']
    assert sched.sigmas.tolist() == pytest.approx([s[0], s[2], s[3], s[4], s[5], s[6]], rel=1e-6)
    assert sched.step_index is None and sched.begin_index is None
    x, n = torch.ones(1, 4, 2, 2), torch.full([1, 4, 2, 2], 2.0)
    torch.testing.assert_close(sched.add_noise(x, n, sched.timesteps[1:2]), x + 2 * float(sched.sigmas[1]))
    with pytest.raises(ValueError) as e:
        pipeline(sd['model'], sched)(PROMPT, height=32, width=32, output_type='latent')
    assert 'not num_inference_steps=50: pass num_inference_steps=5' in str(e.value) and '\n' not in str(e.value)


def test_v_prediction(sd):
    """The same network as a v-prediction network (v = alpha eps - sigma_vp x_0 at its input), run with
    prediction_type='v_prediction', samples what the epsilon network samples."""
    model, card = sd['model'], sd['card']

    class VUnet(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.unet, self.config, self.dtype, self.device = unet, unet.config, unet.dtype, unet.device

        def forward(self, x, t, **kw):
            eps = self.unet(x, t, **kw)[0]
            sigma = model.t_to_sigma((t.double().reshape(-1) + 1) / model.num_timesteps).float().reshape(-1, 1, 1, 1)
            alpha, sigma_vp = 1 / (1 + sigma ** 2).sqrt(), sigma / (1 + sigma ** 2).sqrt()
            return (alpha * eps - sigma_vp * (x - sigma_vp * eps) / alpha,)

    z = seeds_latents([6])
    eps_out = run(pipeline(model, AMEDScheduler.from_config(pipe_config(), card=card)), z)
    v_pipe = pipeline(model, AMEDScheduler.from_config(pipe_config(), card=card, prediction_type='v_prediction'))
    v_pipe.unet = VUnet(model.unet)
    torch.testing.assert_close(run(v_pipe, z), eps_out, rtol=1e-4, atol=1e-4)


def test_scheduler_errors_are_one_line(sd):
    with pytest.raises(ValueError, match='needs a solver card'):
        AMEDScheduler().set_timesteps(5)
    with pytest.raises(ValueError, match="runs epsilon and v_prediction networks, not prediction_type='sample'"):
        AMEDScheduler(card=sd['card'], prediction_type='sample')
    from models.toy import GaussianMixture
    toy = GaussianMixture(seed=0)
    spec, t = solvers.prepare(toy, 'euler', num_steps=3)
    toy_card = C.build_card(toy, spec, t, False, [0.5, 0.5], [1.0, 1.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="made for a model with sigma_min 0.002; this scheduler's noise schedule"):
        AMEDScheduler(card=toy_card)
    scheduler = AMEDScheduler(card=sd['card'])
    with pytest.raises(ValueError, match='call set_timesteps'):
        scheduler.step(torch.zeros(1, 4, 16, 16), 0, torch.zeros(1, 4, 16, 16))


MODEL_ID = "'stable-diffusion-v1-5/stable-diffusion-v1-5'"


def run_as_written(code, folder, doc):
    assert MODEL_ID in code
    exec(compile(code.replace(MODEL_ID, repr(folder)), doc, 'exec'), {})


@pytest.mark.parametrize('doc,title', [('README.md', 'AMED in diffusers'),
                                       ('docs/integrations.md', 'diffusers: text to image')])
def test_readme_snippet_runs(doc, title, sd, tmp_path, monkeypatch):
    """The diffusers examples of README and docs, as written, with the tiny pipeline in place of the
    model id: text to image samples what solvers.sample with the card does; the docs' image to image
    runs on that image."""
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
    run_as_written(snippet(title, doc), folder, doc)
    png = np.asarray(PIL.Image.open('astronaut.png')).astype(int)
    model = sd['model']
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = model.encode_prompts(['a photograph of an astronaut riding a horse'], 'cpu')
    x = solvers.sample(model, z, cond, predictor=C.CardPredictor(sd['card']), **card_kwargs(sd['card']))
    assert np.abs(to_uint8(model.decode(x))[0].astype(int) - png).max() <= 1
    if doc != 'README.md':
        index['_class_name'] = 'StableDiffusionImg2ImgPipeline'
        with open(os.path.join(folder, 'model_index.json'), 'w') as f:
            json.dump(index, f)
        run_as_written(snippet('diffusers: image to image', doc), folder, doc)
        out = np.asarray(PIL.Image.open('astronaut-watercolour.png')).astype(int)
        assert out.shape == png.shape and np.abs(out - png).max() > 0
