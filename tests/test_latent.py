"""Latent models: Stable Diffusion v1.x with classifier-free guidance (``ms_coco``) and LDM
LSUN Bedroom (``lsun_bedroom_ldm``), loaded offline from tiny random checkpoints in the official
layouts (tests/latent_fixtures.py) through the real loaders, then sampled, decoded, trained and
sampled again through train.py / sample.py."""

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
import train  # noqa: E402
from models.latent import DiscreteEpsDenoiser, linear_alphas_cumprod  # noqa: E402
from models.presets import load_model  # noqa: E402
from torch_utils.misc import StackedRandomGenerator  # noqa: E402
from predictors.networks import AMEDPredictor  # noqa: E402

CAPTIONS = ['a red cat', 'two dogs on a bed', 'a bedroom', 'zebra 7', 'an empty room']
STUDENTS = [('euler', {}), ('ipndm', {}), ('dpm', {}), ('dpmpp', dict(predict_x0=False, max_order=2)),
            ('dpmpp', dict(predict_x0=True, max_order=3))]


@pytest.fixture(scope='module')
def files(tmp_path_factory, single_thread):
    root = tmp_path_factory.mktemp('latent')
    saved = os.environ.get('DNNLIB_CACHE_DIR')
    os.environ['DNNLIB_CACHE_DIR'] = str(root / 'cache')
    out = dict(root=root)
    out['sd_folder'] = F.write_sd_folder(str(root / 'sd-diffusers'))
    out['sd_ckpt'] = F.write_sd_single_file(str(root / 'sd-ckpt'))
    out['sd_safetensors'] = F.write_sd_single_file(str(root / 'sd-st'), fmt='safetensors')
    out['sd_ema'] = F.write_sd_single_file(str(root / 'sd-ema'), ema=True)
    out['captions'] = F.write_captions(str(root / 'captions.csv'), CAPTIONS)
    out['ldm'], out['ldm_unet'], out['ldm_vq'] = F.write_ldm(str(root / 'ldm'), zip_name='lsun_bedrooms.zip')
    yield out
    if saved is None:
        os.environ.pop('DNNLIB_CACHE_DIR', None)
    else:
        os.environ['DNNLIB_CACHE_DIR'] = saved


def sd(files, which='sd_ckpt', rate=7.5, **kw):
    kw.setdefault('prompt_path', files['captions'])
    return load_model('ms_coco', files[which], 'cfg', rate, **kw)


def unet_calls(model):
    """Record the batch size of every U-Net call."""
    calls = []
    model.unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    return calls


def test_missing_extra_is_one_line(monkeypatch):
    """Without diffusers/transformers the latent presets say what to install."""
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec',
                        lambda name, *a: None if name in ('diffusers', 'transformers') else real(name, *a))
    with pytest.raises(ValueError, match=r"needs diffusers, transformers: pip install -r requirements-latent.txt"):
        load_model('ms_coco', 'x', 'cfg', 7.5, prompt='p')
    with pytest.raises(ValueError, match=r"needs diffusers: pip install -r requirements-latent.txt"):
        load_model('lsun_bedroom_ldm', 'x')


# ---------------------------------------------------------------------------------------------
# The discrete-time VP maps (the official code).

def test_discrete_maps_match_the_reference_values():
    sd_maps = DiscreteEpsDenoiser(linear_alphas_cumprod(0.00085, 0.012))
    ldm_maps = DiscreteEpsDenoiser(linear_alphas_cumprod(0.0015, 0.0195))
    assert sd_maps.sigma_min == pytest.approx(0.029168, rel=1e-4)
    assert sd_maps.sigma_max == pytest.approx(14.6146, rel=1e-5)
    assert ldm_maps.sigma_min == pytest.approx(0.03876, rel=1e-4)
    assert ldm_maps.sigma_max == pytest.approx(83.822, rel=1e-5)
    # At the keypoints sigma is exactly sqrt((1 - abar) / abar) and the timestep is n.
    abar = linear_alphas_cumprod(0.00085, 0.012)
    n = torch.tensor([0, 1, 17, 500, 998, 999])
    sig = sd_maps.t_to_sigma((n + 1).double() / 1000)
    torch.testing.assert_close(sig, ((1 - abar[n]) / abar[n]).sqrt(), rtol=1e-12, atol=0)
    torch.testing.assert_close(sd_maps.timestep(sig), n.double(), rtol=0, atol=1e-9)
    # Round trip, including the linear extension below t = 1e-3.
    t = torch.linspace(0.0003, 1.0, 257, dtype=torch.float64)
    torch.testing.assert_close(sd_maps.sigma_to_t(sd_maps.t_to_sigma(t)), t, rtol=0, atol=1e-12)
    # The discrete schedule with rho 1 and 11 points: timesteps 999, 899.1, ..., 99.9, 0 (the official code
    # rounds them to 999, 899, ..., 100, 0).
    t_steps = solvers.get_model_schedule(sd_maps, 11, schedule_type='discrete', schedule_rho=1.0)
    torch.testing.assert_close(sd_maps.timestep(t_steps), torch.linspace(999, 0, 11, dtype=torch.float64),
                               rtol=0, atol=1e-6)


def test_shipped_configs_are_the_official_architectures():
    """Parameter counts of SD v1 (U-Net 859,520,964, VAE 83,653,863, CLIP ViT-L/14 text 123,060,480)
    and LDM LSUN Bedroom (U-Net 274,056,163), built on the meta device; feature widths of the hook."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from models.ldm import CONFIG
    from models.networks_adm import UNetModel
    from models.stable_diffusion import CONFIG_DIR
    with torch.device('meta'):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIG_DIR, subfolder='unet'))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIG_DIR, subfolder='vae'))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(os.path.join(CONFIG_DIR, 'text_encoder')))
        ldm = UNetModel(**CONFIG['unet'])
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(unet), count(vae), count(text), count(ldm)) == (859520964, 83653863, 123060480, 274056163)
    assert unet.mid_block.resnets[-1].out_channels == 1280 and ldm.middle_block[-1].out_channels == 896
    assert vae.config.scaling_factor == 0.18215


# ---------------------------------------------------------------------------------------------
# Stable Diffusion loading, guidance, prompts.

def test_sd_layouts_load_the_same_network(files):
    """diffusers folder, single .ckpt, single .safetensors and an EMA single file (raw weights
    perturbed, EMA = the seed's) all give the same U-Net, VAE and text encoder."""
    models = [sd(files, k) for k in ('sd_folder', 'sd_ckpt', 'sd_safetensors', 'sd_ema')]
    ref = models[0]
    for m in models[1:]:
        for part in ('unet', 'vae', 'text_encoder'):
            a, b = getattr(ref, part).state_dict(), getattr(m, part).state_dict()
            assert a.keys() == b.keys()
            for k in a:
                assert torch.equal(a[k], b[k]), (part, k)
    rnd = StackedRandomGenerator('cpu', [0, 3])
    x = rnd.randn([2, *ref.img_shape]) * 2
    cond = ref.sample_cond(rnd, 2)
    sigma = torch.tensor([5.0, 0.3])
    d0 = ref(x, sigma, cond)
    for m in models[1:]:
        torch.testing.assert_close(m.sample_cond(StackedRandomGenerator('cpu', [0, 3]), 2), cond)
        # The single file's float32 alphas_cumprod and the scheduler's differ in the last bits.
        torch.testing.assert_close(m(x, sigma, cond), d0, rtol=0, atol=1e-3)
        torch.testing.assert_close(m.decode(x), ref.decode(x))
    assert ref.img_shape == (4, 16, 16) and ref.decode(x).shape == (2, 3, 32, 32)
    assert ref.sigma_min == pytest.approx(0.029168, rel=1e-4) and ref.sigma_max == pytest.approx(14.6146, rel=1e-4)


def test_cfg_is_one_batched_call_and_matches_its_formula(files):
    m = sd(files, rate=7.5)
    calls = unet_calls(m)
    assert m.calls_per_eval == 2
    rnd = StackedRandomGenerator('cpu', [1, 2, 4])
    x, cond = rnd.randn([3, *m.img_shape]) * 4, m.sample_cond(rnd, 3)
    sigma = torch.tensor([8.0, 1.0, 0.1])
    d = m(x, sigma, cond)
    assert calls == [6]
    s = sigma.view(-1, 1, 1, 1)
    x_in, ts = x / (s ** 2 + 1).sqrt(), m.timestep(sigma).float()
    with torch.no_grad():
        eps_c = m.unet(x_in, ts, encoder_hidden_states=cond).sample
        eps_u = m.unet(x_in, ts, encoder_hidden_states=m.encode_prompts([''] * 3, 'cpu')).sample
    torch.testing.assert_close(d, x - s * (eps_u + 7.5 * (eps_c - eps_u)), rtol=1e-4, atol=1e-4)
    # Guidance rate 1 (where the reference breaks): one conditional call, 1 NFE.
    m1 = sd(files, rate=1.0)
    calls1 = unet_calls(m1)
    torch.testing.assert_close(m1(x, sigma, cond), x - s * eps_c, rtol=1e-4, atol=1e-4)
    assert calls1 == [3] and m1.calls_per_eval == 1


def test_gradient_reaches_sigma_through_the_timestep(files):
    """Training differentiates D(x; s) with respect to the inserted time s; the network's timestep
    input depends on s too (as in the official preconditioner), so autograd equals the finite difference."""
    m = load_model('lsun_bedroom_ldm', files['ldm'])
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2
    sigma = torch.tensor([1.3], requires_grad=True)
    (grad,) = torch.autograd.grad(m(x, sigma).sum(), sigma)
    h = 1e-4
    with torch.no_grad():
        fd = (m(x, sigma + h).double().sum() - m(x, sigma - h).double().sum()) / (2 * h)
        # Without the timestep's dependence on sigma the derivative would differ markedly.
        frozen = torch.autograd.functional.jacobian(
            lambda s: (x - s * m.eps(x / (s ** 2 + 1).sqrt(), m.timestep(sigma.detach()).float(), None)).sum(),
            sigma.detach())
    assert float(grad) == pytest.approx(float(fd), rel=5e-3)
    assert abs(float(frozen) - float(fd)) > 0.1 * abs(float(fd))


def test_amed_feature_is_the_conditional_half_of_the_middle_block(files):
    m = sd(files, rate=7.5)
    rnd = StackedRandomGenerator('cpu', [0, 1])
    x, cond = rnd.randn([2, *m.img_shape]), m.sample_cond(rnd, 2)
    sigma = torch.tensor([2.0, 2.0])
    with m.capture_feature() as holder:
        m(x, sigma, cond)
    captured = {}
    handle = m.unet.mid_block.register_forward_hook(lambda mod, i, o: captured.setdefault('out', o))
    with torch.no_grad():
        m.unet(x / (sigma.view(-1, 1, 1, 1) ** 2 + 1).sqrt(), m.timestep(sigma).float(), encoder_hidden_states=cond)
    handle.remove()
    assert holder['feature'].shape == (2, 8, 8)
    torch.testing.assert_close(holder['feature'], captured['out'].mean(dim=1), rtol=1e-4, atol=1e-5)


def test_prompts_map_to_seeds_and_training_draws_them(files):
    m = sd(files)
    seeds = [3, 0, 4]
    assert m.prompts_for(seeds) == [CAPTIONS[3], CAPTIONS[0], CAPTIONS[4]]
    torch.testing.assert_close(m.sample_cond(StackedRandomGenerator('cpu', seeds), 3),
                               m.encode_prompts([CAPTIONS[s] for s in seeds], 'cpu'))
    with pytest.raises(ValueError, match='seed 5 has no caption'):
        m.prompts_for([5])
    # Training: drawn from each trajectory's generator (after its latents), so reproducible per seed.
    draw = lambda s: m.prompts_for(s, StackedRandomGenerator('cpu', s), training=True)  # noqa: E731
    many = list(range(100, 140))
    assert draw(many) == draw(many) and len(set(draw(many))) > 1
    assert draw([7, 123]) == [draw([7])[0], draw([123])[0]]
    one = load_model('ms_coco', files['sd_ckpt'], 'cfg', 7.5, prompt='a small house')
    assert one.prompts_for([0, 99]) == ['a small house'] * 2 and one.captions is None


@pytest.mark.parametrize('bad, message', [
    (dict(guidance_type=None), "not supported by dataset 'ms_coco'"),
    (dict(guidance_rate=None), 'needs --guidance_type=cfg and --guidance_rate'),
    (dict(prompt_path='missing.csv'), 'prompt file not found'),
    (dict(prompt='x', prompt_path='c.csv'), 'either --prompt or --prompt_path'),
    (dict(model_path='missing.ckpt'), 'file not found: missing.ckpt'),
    (dict(classifier_path='c.pt'), 'classifier_path is not used'),
])
def test_sd_bad_options_are_one_line(files, bad, message):
    kw = dict(model_path=files['sd_ckpt'], guidance_type='cfg', guidance_rate=7.5, prompt_path=files['captions'])
    kw.update(bad)
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        load_model('ms_coco', **kw)
    assert message in str(e.value) and '\n' not in str(e.value)


def test_sd_bad_files_are_one_line(files, tmp_path, monkeypatch):
    bad_csv = tmp_path / 'bad.csv'
    bad_csv.write_text('caption\nhello\n')
    with pytest.raises(ValueError, match="no 'text' column"):
        sd(files, prompt_path=str(bad_csv))
    # A single file whose weights do not fit the configs beside it.
    other = F.write_sd_single_file(str(tmp_path / 'other'))
    import json
    cfg = json.load(open(tmp_path / 'other' / 'unet' / 'config.json'))
    cfg['block_out_channels'] = [16, 64]
    json.dump(cfg, open(tmp_path / 'other' / 'unet' / 'config.json', 'w'))
    with pytest.raises(ValueError) as e:
        load_model('ms_coco', other, 'cfg', 7.5, prompt='x')
    assert 'does not match the Stable Diffusion configs' in str(e.value) and '\n' not in str(e.value)
    # A single file without a tokenizer beside it, offline.
    import shutil
    shutil.rmtree(tmp_path / 'other' / 'tokenizer')
    cfg['block_out_channels'] = [32, 64]
    json.dump(cfg, open(tmp_path / 'other' / 'unet' / 'config.json', 'w'))
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf'))    # an empty Hugging Face cache
    with pytest.raises(FileNotFoundError) as e:
        load_model('ms_coco', other, 'cfg', 7.5, prompt='x')
    assert 'tokenizer' in str(e.value) and '\n' not in str(e.value)


# ---------------------------------------------------------------------------------------------
# LDM loading.

def test_ldm_loads_ema_weights_from_the_official_layouts(files, tmp_path, monkeypatch, capsys):
    direct = load_model('lsun_bedroom_ldm', files['ldm'], 'uncond', 1.0)
    # The pickled training callback (which weights_only refuses) is read as a placeholder.
    assert 'read tests.latent_fixtures.TrainingCallback as placeholders' in capsys.readouterr().out
    zipped = load_model('lsun_bedroom_ldm', os.path.join(os.path.dirname(files['ldm']), 'lsun_bedrooms.zip'))
    for k, v in files['ldm_unet'].state_dict().items():   # the EMA copy, not the perturbed raw weights
        assert torch.equal(direct.unet.state_dict()[k], v) and torch.equal(zipped.unet.state_dict()[k], v)
    x, sigma = torch.randn(2, 3, 16, 16) * 10, torch.tensor([10.0, 0.05])
    s = sigma.view(-1, 1, 1, 1)
    with torch.no_grad():
        ref = x - s * files['ldm_unet'](x / (s ** 2 + 1).sqrt(), direct.timestep(sigma).float())
        torch.testing.assert_close(direct(x, sigma), ref)
        torch.testing.assert_close(direct.decode(x), files['ldm_vq'].decode(x).sample)   # quantised, then decoded
    assert direct.decode(x).shape == (2, 3, 32, 32) and direct.calls_per_eval == 1
    assert direct.sigma_max == pytest.approx(83.822, rel=1e-5)

    # The VQ-f4 weights in a separate file at the official README's path (relative to the working folder).
    monkeypatch.chdir(tmp_path)
    path, _, vq = F.write_ldm(str(tmp_path / 'm'), first_stage_inside=False,
                              vq_path='models/ldm_models/first_stage_models/vq-f4/model.ckpt')
    sep = load_model('lsun_bedroom_ldm', path)
    torch.testing.assert_close(sep.decode(x), vq.decode(x).sample)


def test_ldm_missing_files_say_where_to_put_them(files, tmp_path, monkeypatch):
    import models.ldm as ldm
    monkeypatch.chdir(tmp_path)
    closed = 'http://127.0.0.1:9/'
    monkeypatch.setitem(ldm.URLS, 'lsun_bedroom_ldm', closed + 'lsun_bedrooms.zip')
    monkeypatch.setitem(ldm.URLS, 'vq-f4', closed + 'vq-f4.zip')
    with pytest.raises(FileNotFoundError) as e:
        load_model('lsun_bedroom_ldm')
    msg = str(e.value)
    assert 'put it at ./src/lsun_bedroom_ldm/model.ckpt or pass --model_path' in msg and '\n' not in msg
    path, _, _ = F.write_ldm(str(tmp_path / 'nofs'), first_stage_inside=False, vq_path=str(tmp_path / 'elsewhere.ckpt'))
    with pytest.raises(FileNotFoundError) as e:
        load_model('lsun_bedroom_ldm', path)
    assert 'put it at ./models/ldm_models/first_stage_models/vq-f4/model.ckpt' in str(e.value)
    with pytest.raises(ValueError, match='guidance_rate must be 1'):
        load_model('lsun_bedroom_ldm', path, 'uncond', 3.0)


# ---------------------------------------------------------------------------------------------
# Sampling with every student, with and without guidance and predictor.

@pytest.mark.parametrize('which', ['sd_cfg', 'sd_w1', 'ldm'])
def test_every_student_samples_and_decodes(files, which):
    model = dict(sd_cfg=lambda: sd(files, rate=7.5), sd_w1=lambda: sd(files, rate=1.0),
                 ldm=lambda: load_model('lsun_bedroom_ldm', files['ldm'], 'uncond', 1.0))[which]()
    rnd = StackedRandomGenerator('cpu', [0, 1])
    latents, cond = rnd.randn([2, *model.img_shape]), model.sample_cond(rnd, 2)
    torch.manual_seed(0)
    predictor = AMEDPredictor(scale_dir=0.01, scale_time=0.2)
    for solver, extra in STUDENTS + [('amed', {})]:
        for pred in ([predictor] if solver == 'amed' else [None, predictor]):
            calls = unet_calls(model)
            x = solvers.sample(model, latents, cond, solver=solver, num_steps=4, schedule_type='discrete',
                               schedule_rho=1.0, afs=True, predictor=pred, **extra)
            images = model.decode(x)
            assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all(), (solver, pred)
            nfe = solvers.count_nfe(solver, 4, True, pred is not None,
                                                 calls_per_eval=model.calls_per_eval)
            assert len(calls) * model.calls_per_eval == nfe, (solver, pred, calls)
            model.unet._forward_hooks.clear()


def test_dynamic_thresholding_is_off_by_default_on_latents(files):
    """Dynamic thresholding clips data predictions to pixel range; on latents it is off unless asked for."""
    model = load_model('lsun_bedroom_ldm', files['ldm'])
    assert solvers.prepare(model, 'dpmpp', predict_x0=True)[0].thresholding is False
    assert solvers.prepare(model, 'dpmpp', predict_x0=True, thresholding=True)[0].thresholding is True
    from training.loss import AMEDLoss
    loss = AMEDLoss(model, 'dpmpp', 'dpmpp', num_steps=4, M=1, schedule_type='discrete', schedule_rho=1.0)
    assert loss.student.thresholding is False and loss.teacher.thresholding is False
    from models.toy import GaussianMixture
    assert solvers.prepare(GaussianMixture(seed=0), 'dpmpp')[0].thresholding is True


# ---------------------------------------------------------------------------------------------
# train.py and sample.py with the official recipes.

def run(cmd, args):
    result = CliRunner().invoke(cmd, args, catch_exceptions=False)
    return result.exit_code, result.output


def test_sd_recipe_trains_and_samples(files, tmp_path, monkeypatch):
    """The official launch script's SD recipe (dpmpp/dpmpp, N=4, M=2, AFS, scale_time 0.2, discrete rho 1,
    max_order 2, predict_x0 False, cfg 7.5) at toy size: the run's NFE counts the CFG doubling."""
    monkeypatch.chdir(tmp_path)
    code, out = run(train.main, [
        '--dataset_name=ms_coco', f"--model_path={files['sd_ckpt']}", f"--prompt_path={files['captions']}",
        '--batch=4', '--total_kimg=0.008', '--sampler_stu=dpmpp', '--sampler_tea=dpmpp', '--num_steps=4', '--M=2',
        '--afs=True', '--scale_dir=0', '--scale_time=0.2', '--schedule_type=discrete', '--schedule_rho=1',
        '--max_order=2', '--predict_x0=False', '--lower_order_final=True', '--guidance_type=cfg',
        '--guidance_rate=7.5', '--no-progress'])
    assert code == 0, out
    assert os.listdir('exps') == ['00000-ms_coco-4-10-dpmpp-dpmpp-2-discrete-afs']
    code, out = run(sample.main, ['--predictor_path=0', f"--model_path={files['sd_ckpt']}",
                                  f"--prompt_path={files['captions']}", '--seeds=0-2', '--batch=2', '--outdir=out',
                                  '--no-progress'])
    assert code == 0, out
    assert '10 NFE' in out
    imgs = [np.asarray(PIL.Image.open(f'out/000000/{s:06d}.png')) for s in range(3)]
    assert all(i.shape == (32, 32, 3) for i in imgs)
    # Caption i for seed i: seed 1 sampled alone with --prompt=<caption 1> is the same image (up to
    # rounding: the batch size changes the U-Net's float sums), with another caption it is not.
    for name, prompt in (('one', CAPTIONS[1]), ('other', CAPTIONS[2])):
        code, out = run(sample.main, ['--predictor_path=0', f"--model_path={files['sd_ckpt']}",
                                      f'--prompt={prompt}', '--seeds=1', f'--outdir={name}', '--no-progress'])
        assert code == 0, out
    diff = lambda d: np.abs(np.asarray(PIL.Image.open(f'{d}/000000/000001.png'), dtype=np.int16)  # noqa: E731
                            - imgs[1].astype(np.int16))
    assert diff('one').max() <= 1 and diff('one').mean() < 0.01
    assert diff('other').mean() > 1
    code, out = run(sample.main, ['--predictor_path=0', f"--model_path={files['sd_ckpt']}",
                                  f"--prompt_path={files['captions']}", '--seeds=4-5', '--outdir=bad', '--no-progress'])
    assert code != 0 and 'seed 5 has no caption' in out


def test_sd_torchrun_two_processes_follow_the_seeds(files, tmp_path, monkeypatch):
    """torchrun with 2 processes (gloo): the seeds are split across ranks, each image still gets
    its own seed's caption and noise, so the images match one process (up to rounding)."""
    from tests.test_train_sample import torchrun
    monkeypatch.chdir(tmp_path)
    common = ['--dataset_name=ms_coco', f"--model_path={files['sd_ckpt']}", f"--prompt_path={files['captions']}",
              '--guidance_type=cfg', '--guidance_rate=3', '--solver=dpmpp', '--num_steps=4', '--predict_x0=False',
              '--schedule_type=discrete', '--schedule_rho=1', '--seeds=0-4', '--batch=2', '--no-progress']
    torchrun('sample.py', common + ['--outdir=two', '--device=cpu'], str(tmp_path))
    code, out = run(sample.main, common + ['--outdir=one'])
    assert code == 0, out
    for seed in range(5):
        a, b = (np.asarray(PIL.Image.open(f'{d}/000000/{seed:06d}.png'), dtype=np.int16) for d in ('one', 'two'))
        assert np.abs(a - b).max() <= 1, seed


def test_ldm_recipe_trains_and_samples(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out = run(train.main, [
        '--dataset_name=lsun_bedroom_ldm', f"--model_path={files['ldm']}", '--batch=4', '--total_kimg=0.008',
        '--sampler_stu=dpmpp', '--sampler_tea=dpmpp', '--num_steps=4', '--M=2', '--afs=True', '--scale_dir=0.01',
        '--scale_time=0', '--schedule_type=discrete', '--schedule_rho=1', '--max_order=3', '--predict_x0=False',
        '--lower_order_final=True', '--guidance_type=uncond', '--guidance_rate=1', '--no-progress'])
    assert code == 0, out
    assert os.listdir('exps') == ['00000-lsun_bedroom_ldm-4-5-dpmpp-dpmpp-2-discrete-afs']
    code, out = run(sample.main, ['--predictor_path=0', f"--model_path={files['ldm']}", '--seeds=0-3', '--batch=3',
                                  '--grid', '--outdir=grid', '--no-progress'])
    assert code == 0, out
    assert np.asarray(PIL.Image.open('grid/grid.png')).shape == (64, 64, 3)
