"""The ComfyUI nodes (integrations/comfyui) run by ComfyUI's own sampler code: the SamplerCustom node,
CFGGuider and comfy.samplers.KSAMPLER of the PyPI ``comfyui`` package (tests/run.sh installs it with
--no-deps), on a tiny Stable Diffusion U-Net inside ComfyUI's BaseModel and ModelPatcher. Nothing of
ComfyUI is stubbed; without the package these tests skip saying so."""

import json
import math
import os

import pytest
import torch

pytest.importorskip('diffusers')
pytest.importorskip('transformers')

from tests import latent_fixtures as F  # noqa: E402
import solvers  # noqa: E402
from integrations import card as C  # noqa: E402
from integrations.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402
from integrations.comfyui.nodes import AMEDCardSampler, AMEDCardSigmas  # noqa: E402
from models.presets import load_model  # noqa: E402
from tests.peers import comfyui  # noqa: E402

PROMPT = 'a red cat'
RATE = 7.5
WORKFLOW = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'integrations', 'comfyui',
                        'example_workflow_api.json')


@pytest.fixture(scope='module')
def sd(tmp_path_factory, single_thread):
    """A tiny SD folder, the model as sample.py loads it, and an AFS DPM-Solver++(2M) card with
    per-step r, scale_dir and scale_time (written to card.json)."""
    root = tmp_path_factory.mktemp('comfy')
    folder = F.write_sd_folder(str(root / 'sd'))
    model = load_model('ms_coco', folder, 'cfg', RATE, prompt=PROMPT)
    t = solvers.get_model_schedule(model, 5, schedule_type='discrete', schedule_rho=1.0)
    spec, _ = solvers.prepare(model, 'dpmpp', t_steps=t, max_order=2, predict_x0=True, lower_order_final=True,
                              thresholding=False)
    card = C.build_card(model, spec, t, True, r=[0.45, 0.6, 0.5, 0.55], scale_dir=[1.0, 0.97, 1.02, 1.01],
                        scale_time=[1.0, 1.03, 0.98, 1.0])
    C.save_card(card, str(root / 'card.json'))
    return dict(root=root, folder=folder, model=model, card=card, card_path=str(root / 'card.json'))


def comfy_model(model, betas=F.SD_BETAS):
    """ComfyUI's BaseModel (EPS, SD1.5 latent format, the noise schedule of ``betas``) in a ModelPatcher,
    with the tiny diffusers U-Net as its diffusion model."""
    latent_formats = comfyui('comfy.latent_formats')
    model_base = comfyui('comfy.model_base')
    model_patcher = comfyui('comfy.model_patcher')
    base = comfyui('comfy.supported_models_base')

    class TinySD(base.BASE):
        latent_format = latent_formats.SD15
        sampling_settings = dict(linear_start=betas[0], linear_end=betas[1], beta_schedule='linear')

    class Unet(torch.nn.Module):   # ComfyUI's diffusion-model call: (x, timesteps, context=..., **options)
        def __init__(self, unet):
            super().__init__()
            self.unet = unet
            self.dtype = unet.dtype

        def forward(self, x, timesteps, context=None, **kwargs):
            return self.unet(x, timesteps, encoder_hidden_states=context, return_dict=False)[0]

    comfy_base = model_base.BaseModel(TinySD({'disable_unet_model_creation': True}), model_base.ModelType.EPS,
                                      device='cpu')
    comfy_base.diffusion_model = Unet(model.unet)
    return model_patcher.ModelPatcher(comfy_base, load_device=torch.device('cpu'), offload_device=torch.device('cpu'))


def nearest_training_timesteps(model):
    """The model fed at ComfyUI's timesteps: the training step nearest in log sigma (ComfyUI's
    ModelSamplingDiscrete.timestep), where sample.py feeds the continuous 1000 t - 1."""
    log_levels = model.t_to_sigma(torch.arange(1, model.num_timesteps + 1, dtype=torch.float64)
                                  / model.num_timesteps).log()
    model.timestep = lambda sigma: (sigma.double().log().reshape(-1, 1) - log_levels).abs().argmin(1).double()
    return model


def conditioning(model):
    return ([[model.encode_prompts([PROMPT], 'cpu'), {}]], [[model.encode_prompts([''], 'cpu'), {}]])


def custom_sample(patcher, model, sampler, sigmas, latent, seed=0):
    """ComfyUI's SamplerCustom node: returns (output latent, denoised output latent)."""
    nodes = comfyui('comfy_extras.nodes.nodes_custom_sampler')
    positive, negative = conditioning(model)
    out, denoised = nodes.SamplerCustom().sample(patcher, True, seed, RATE, positive, negative, sampler, sigmas,
                                                 {'samples': latent})
    return out['samples'], denoised['samples']


def assert_float_close(ours, ref):
    """Equal up to float32 rounding (relative 1e-5 of the norm; about 2e-6 is seen): ComfyUI applies CFG
    to D = x - sigma eps (|x| up to ~15) and scales the noise in float32, the project applies CFG to
    eps. ComfyUI's own Euler sampler differs from the project's Euler solver by as much
    (test_sigmas_node_drives_comfyuis_own_sampler)."""
    error = ((ours - ref).norm() / ref.norm()).item()
    print(f'relative difference {error:.2e}')
    assert error < 1e-5, error


def card_kwargs(card, **override):
    return dict(C.card_solver_settings(C.load_card(card)).sample_kwargs(), **override)


def test_mappings_follow_comfyui_conventions():
    assert set(NODE_CLASS_MAPPINGS) == set(NODE_DISPLAY_NAME_MAPPINGS) == {'AMEDCardSampler', 'AMEDCardSigmas'}
    for cls in NODE_CLASS_MAPPINGS.values():
        spec = cls.INPUT_TYPES()
        assert set(spec) == {'required'} and callable(getattr(cls(), cls.FUNCTION))
        assert len(cls.RETURN_TYPES) == len(cls.RETURN_NAMES) and cls.CATEGORY.startswith('sampling/')
    assert AMEDCardSampler.RETURN_TYPES == ('SAMPLER', 'SIGMAS') and AMEDCardSigmas.RETURN_TYPES == ('SIGMAS',)


def test_txt2img_through_samplercustom_equals_the_card(sd):
    """The node's SAMPLER and SIGMAS in ComfyUI's SamplerCustom (CFG on a cond/uncond batch, ComfyUI's
    noise scaling and latent format) sample what solvers.sample with the card samples from the same
    noise, scaled as ComfyUI scales it (sqrt(1 + sigma_max^2) at the model's sigma_max)."""
    model, card = sd['model'], sd['card']
    latent_formats = comfyui('comfy.latent_formats')
    patcher = comfy_model(model)
    sampler, sigmas = AMEDCardSampler().load(sd['card_path'])
    assert sigmas.dtype == torch.float32 and sigmas.tolist() == pytest.approx(card['t_steps'], rel=1e-6)
    calls = []
    handle = model.unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        out, denoised = custom_sample(patcher, model, sampler, sigmas, torch.zeros(2, 4, 16, 16), seed=3)
    finally:
        handle.remove()
    assert calls == [4] * card['evaluations']    # one U-Net call per evaluation, cond and uncond batched
    z = comfyui('comfy.sample').prepare_noise(torch.zeros(2, 4, 16, 16), 3)
    sigma0 = card['t_steps'][0]
    ref_model = nearest_training_timesteps(load_model('ms_coco', sd['folder'], 'cfg', RATE, prompt=PROMPT))
    cond = model.encode_prompts([PROMPT] * 2, 'cpu')
    ref = solvers.sample(ref_model, z * math.sqrt(1 + sigma0 ** 2) / sigma0, cond, predictor=C.CardPredictor(card),
                         **card_kwargs(card))
    ours = latent_formats.SD15().process_in(out)
    assert ref.abs().max() > 1
    assert_float_close(ours, ref)
    assert denoised.shape == out.shape and torch.isfinite(denoised).all()
    # The same with ComfyUI's sqrt(1 + sigma^2) start undone is sample.py's noise convention: x = z * sigma_max.
    # With the trailing 0 the sampler ends with one more call, D at the last sigma (solvers' denoise_to_zero).
    sampler, sigmas = AMEDCardSampler().load(sd['card_path'], step_to_zero=True)
    out_zero, _ = custom_sample(patcher, model, sampler, sigmas, torch.zeros(2, 4, 16, 16), seed=3)
    ref_zero = solvers.sample(ref_model, z * math.sqrt(1 + sigma0 ** 2) / sigma0, cond,
                              predictor=C.CardPredictor(card), denoise_to_zero=True, **card_kwargs(card))
    assert_float_close(latent_formats.SD15().process_in(out_zero), ref_zero)


def test_img2img_denoise_runs_a_tail_of_the_card(sd):
    """denoise < 1: the card's last intervals from the noised latent (ComfyUI adds noise * sigma to
    the latent), the multistep history restarting there and AFS off."""
    model, card = sd['model'], sd['card']
    latent_formats = comfyui('comfy.latent_formats')
    patcher = comfy_model(model)
    sampler, sigmas = AMEDCardSampler().load(sd['card_path'], denoise=0.5)
    assert sigmas.tolist() == pytest.approx(card['t_steps'][2:], rel=1e-6)
    image = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5)) * 4
    out, _ = custom_sample(patcher, model, sampler, sigmas, image, seed=1)
    z = comfyui('comfy.sample').prepare_noise(image, 1)
    x0 = latent_formats.SD15().process_in(image)
    ref_model = nearest_training_timesteps(load_model('ms_coco', sd['folder'], 'cfg', RATE, prompt=PROMPT))
    tail = card['t_steps'][2:]
    ref = solvers.sample(ref_model, z + x0 / tail[0], model.encode_prompts([PROMPT], 'cpu'),
                         predictor=C.CardPredictor(card), **card_kwargs(card, t_steps=tail, afs=False))
    assert_float_close(latent_formats.SD15().process_in(out), ref)
    for bad, message in ((0.1, 'denoise 0.1 keeps no interval of the 4-interval solver card'),
                         (1.5, 'denoise must lie in (0, 1]')):
        with pytest.raises(ValueError) as e:
            AMEDCardSampler().load(sd['card_path'], denoise=bad)
        assert message in str(e.value) and '\n' not in str(e.value)


def test_foreign_sigmas_are_refused_in_one_line(sd):
    """The card's SAMPLER with another scheduler's SIGMAS (ComfyUI's karras), or on a model of another
    noise range, stops before any model call."""
    model = sd['model']
    samplers = comfyui('comfy.samplers')
    patcher = comfy_model(model)
    sampler, _ = AMEDCardSampler().load(sd['card_path'])
    karras = samplers.calculate_sigmas(patcher.model.model_sampling, 'karras', 8)
    with pytest.raises(ValueError) as e:
        custom_sample(patcher, model, sampler, karras, torch.zeros(1, 4, 16, 16))
    assert 'sigmas do not match the solver card' in str(e.value) and '\n' not in str(e.value)
    # A model of another noise range (here LDM's betas, sigma_max 3.9 ... not SD's 14.6) with the card's own sigmas.
    other = comfy_model(model, betas=F.LDM_BETAS)
    sampler, sigmas = AMEDCardSampler().load(sd['card_path'])
    with pytest.raises(ValueError) as e:
        custom_sample(other, model, sampler, sigmas, torch.zeros(1, 4, 16, 16))
    assert str(e.value).startswith('the solver card was made for a model with sigma_min 0.0291') and '\n' not in str(e.value)


def test_sigmas_node_drives_comfyuis_own_sampler(sd):
    """The SIGMAS-only node with ComfyUI's Euler sampler: its t_steps and the final step to 0, equal to
    the project's Euler solver on the card's t_steps with denoise_to_zero."""
    model, card = sd['model'], sd['card']
    latent_formats = comfyui('comfy.latent_formats')
    samplers = comfyui('comfy.samplers')
    (sigmas,) = AMEDCardSigmas().load(sd['card_path'])
    assert sigmas.tolist()[-1] == 0 and sigmas.tolist()[:-1] == pytest.approx(card['t_steps'], rel=1e-6)
    out, _ = custom_sample(comfy_model(model), model, samplers.ksampler('euler'), sigmas, torch.zeros(1, 4, 16, 16),
                           seed=2)
    z = comfyui('comfy.sample').prepare_noise(torch.zeros(1, 4, 16, 16), 2)
    sigma0 = card['t_steps'][0]
    ref_model = nearest_training_timesteps(load_model('ms_coco', sd['folder'], 'cfg', RATE, prompt=PROMPT))
    ref = solvers.sample(ref_model, z * math.sqrt(1 + sigma0 ** 2) / sigma0, model.encode_prompts([PROMPT], 'cpu'),
                         solver='euler', t_steps=card['t_steps'], denoise_to_zero=True)
    assert_float_close(latent_formats.SD15().process_in(out), ref)


def test_example_workflow_wires_the_nodes(sd, tmp_path):
    """The example workflow (ComfyUI's API format): every link points at an existing node output of the
    right type, the AMED and SamplerCustom inputs are those the nodes declare, and its card node loads a card."""
    with open(WORKFLOW) as f:
        graph = json.load(f)
    declared = {'CheckpointLoaderSimple': ('MODEL', 'CLIP', 'VAE'), 'CLIPTextEncode': ('CONDITIONING',),
                'EmptyLatentImage': ('LATENT',), 'VAEDecode': ('IMAGE',), 'SaveImage': ()}
    nodes = {name: cls for name, cls in NODE_CLASS_MAPPINGS.items()}
    custom = comfyui('comfy_extras.nodes.nodes_custom_sampler')
    nodes['SamplerCustom'] = custom.SamplerCustom
    outputs = {k: nodes[n['class_type']].RETURN_TYPES if n['class_type'] in nodes else declared[n['class_type']]
               for k, n in graph.items()}
    for key, node in graph.items():
        cls = nodes.get(node['class_type'])
        required = cls.INPUT_TYPES()['required'] if cls else {}
        assert set(required) <= set(node['inputs']), (key, set(required) - set(node['inputs']))
        for name, value in node['inputs'].items():
            if isinstance(value, list):
                source, index = value
                assert source in graph, (key, name)
                if name in required and isinstance(required[name][0], str):
                    assert outputs[source][index] == required[name][0], (key, name)
    sampler_node = next(n for n in graph.values() if n['class_type'] == 'AMEDCardSampler')
    custom_node = next(n for n in graph.values() if n['class_type'] == 'SamplerCustom')
    assert graph[custom_node['inputs']['sampler'][0]] is sampler_node
    assert graph[custom_node['inputs']['sigmas'][0]] is sampler_node
    sampler, sigmas = AMEDCardSampler().load(**dict(sampler_node['inputs'], card_path=sd['card_path']))
    assert sigmas.tolist() == pytest.approx(sd['card']['t_steps'], rel=1e-6)
    assert sampler.extra_options['card'] == sd['card']


def load_as_comfyui_does(path):
    """Import a custom-node folder the way ComfyUI's loader does: the folder's __init__.py as a module
    named after the folder (no package of ours around it)."""
    import importlib.util
    import sys
    name = os.path.basename(path)
    spec = importlib.util.spec_from_file_location(name, os.path.join(path, '__init__.py'))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


@pytest.mark.parametrize('doc,title', [('docs/integrations.md', 'ComfyUI'), ('README.md', 'AMED in k-diffusion / ComfyUI')])
def test_install_as_the_docs_say(doc, title, tmp_path, monkeypatch):
    """The install line of docs/integrations.md and README, run as written: the linked folder finds the
    repository and exports the nodes; a copy needs AMED_SOLVER_ROOT and says so in one line without it."""
    import shutil
    import subprocess

    from tests.readme import ROOT, snippet
    comfy = tmp_path / 'ComfyUI'
    (comfy / 'custom_nodes').mkdir(parents=True)
    subprocess.run(['bash', '-c', snippet(title, doc, lang='bash')], check=True,
                   env=dict(os.environ, AMED=ROOT, COMFYUI=str(comfy)))
    linked = load_as_comfyui_does(str(comfy / 'custom_nodes' / 'amed-solver'))
    assert set(linked.NODE_CLASS_MAPPINGS) == set(NODE_CLASS_MAPPINGS)
    assert linked.NODE_DISPLAY_NAME_MAPPINGS == NODE_DISPLAY_NAME_MAPPINGS
    copy = comfy / 'custom_nodes' / 'amed-copy'
    shutil.copytree(os.path.join(ROOT, 'integrations', 'comfyui'), copy)
    monkeypatch.delenv('AMED_SOLVER_ROOT', raising=False)
    with pytest.raises(ImportError) as e:
        load_as_comfyui_does(str(copy))
    assert 'set AMED_SOLVER_ROOT to the repository folder' in str(e.value) and '\n' not in str(e.value)
    monkeypatch.setenv('AMED_SOLVER_ROOT', ROOT)
    assert set(load_as_comfyui_does(str(copy)).NODE_CLASS_MAPPINGS) == set(NODE_CLASS_MAPPINGS)
