"""The 256x256 pixel-model presets (Consistency-Models LSUN, ADM ImageNet-256 with classifier
guidance) on tiny networks of the same architectures, saved as state dicts exactly as the official
files are and loaded through the real loading path (presets, --model_path, --classifier_path)."""

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import sample
import solvers
import train
from models.networks_adm import create_adm_classifier, create_adm_unet, create_cm_unet
from models.presets import load_model
from predictors.networks import AMEDPredictor

TINY_UNET = dict(image_size=32, num_channels=32, num_res_blocks=1, num_heads=4, num_heads_upsample=-1,
                 num_head_channels=16, attention_resolutions='16,8', channel_mult='1,2,2', dropout=0.0,
                 use_scale_shift_norm=True, resblock_updown=True, use_fp16=False, use_new_attention_order=False)
TINY_CM = dict(TINY_UNET, class_cond=False, learn_sigma=False, use_scale_shift_norm=False)
TINY_ADM = dict(TINY_UNET, class_cond=True, learn_sigma=True, num_classes=10)
TINY_CLASSIFIER = dict(image_size=32, classifier_use_fp16=False, classifier_width=32, classifier_depth=1,
                       classifier_attention_resolutions='16,8', classifier_use_scale_shift_norm=True,
                       classifier_resblock_updown=True, classifier_pool='attention', classifier_channel_mult='1,2,2',
                       classifier_num_head_channels=16, num_classes=10)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def save_official_style(path, factory, config, seed):
    """A random-weight network saved as the official files are: a bare state dict, plus the
    architecture sidecar ``<file>.json`` that our loader reads for non-standard sizes."""
    cfg = dict(config)
    extra = {k: cfg.pop(k) for k in ('num_classes',) if k in cfg}
    torch.manual_seed(seed)
    net = factory(cfg, **extra)
    for p in net.parameters():
        p.data.normal_(0, 0.05)
    torch.save(net.state_dict(), path)
    with open(str(path) + '.json', 'w') as f:
        json.dump(dict(config=config), f)


@pytest.fixture
def files(tmp_path):
    save_official_style(tmp_path / 'cm.pt', create_cm_unet, TINY_CM, 0)
    save_official_style(tmp_path / 'adm.pt', create_adm_unet, TINY_ADM, 1)
    save_official_style(tmp_path / 'cls.pt', create_adm_classifier, TINY_CLASSIFIER, 2)
    return tmp_path


def z(b=2):
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def test_cm_preset_loads_and_samples_with_every_student(files):
    model = load_model('lsun_bedroom', model_path=str(files / 'cm.pt'))
    assert (model.sigma_min, model.sigma_max, model.img_shape, model.label_dim) == (0.002, 80.0, (3, 32, 32), 0)
    assert not any(p.requires_grad for p in model.parameters())
    pred = AMEDPredictor(scale_dir=0.01, scale_time=0.2)
    with model.capture_feature() as holder:
        model(z() * 5, torch.tensor([5.0, 5.0]))
    assert holder['feature'].shape == (2, 8, 8)
    for name, opts in [('amed', {}), ('euler', {}), ('ipndm', dict(max_order=4)), ('dpm', {}), ('dpmpp', dict(max_order=3))]:
        for p in ([pred] if name == 'amed' else [None, pred]):
            out = solvers.sample(model, z(), solver=name, num_steps=4, afs=True, predictor=p, **opts)
            assert torch.isfinite(out).all()


def test_cm_preconditioning_formula(files):
    model = load_model('lsun_cat', model_path=str(files / 'cm.pt'))
    x, sigma = z() * 3, torch.tensor([3.0, 0.5])
    s = sigma.reshape(-1, 1, 1, 1)
    inner = model.unet(x / (s ** 2 + 0.25).sqrt(), 250 * torch.log(sigma))
    expected = 0.25 / (s ** 2 + 0.25) * x + s * 0.5 / (s ** 2 + 0.25).sqrt() * inner
    assert torch.allclose(model(x, sigma), expected, atol=1e-5)


def test_adm_guidance(files):
    kw = dict(model_path=str(files / 'adm.pt'), classifier_path=str(files / 'cls.pt'))
    plain = load_model('imagenet256', model_path=kw['model_path'])
    guided = load_model('imagenet256', guidance_type='cg', guidance_rate=4.0, **kw)
    zero = load_model('imagenet256', guidance_type='cg', guidance_rate=0.0, model_path=kw['model_path'])
    assert abs(plain.sigma_min - 0.0104864) < 1e-5 and abs(plain.sigma_max - 152.1670) < 1e-3
    assert plain.sigma_to_t(torch.tensor(plain.sigma_max, dtype=torch.float64)).item() == pytest.approx(1.0)
    assert not any(p.requires_grad for p in guided.parameters())
    labels = torch.tensor([3, 7])
    opts = dict(solver='dpmpp', num_steps=5, schedule_type='discrete', schedule_rho=1.0, afs=True,
                predictor=AMEDPredictor())
    a = solvers.sample(plain, z(), labels, **opts)
    b = solvers.sample(guided, z(), labels, **opts)
    c = solvers.sample(zero, z(), labels, **opts)
    assert torch.equal(a, c) and not torch.allclose(a, b)
    # The guided denoiser matches the formula: eps' = eps - sqrt(1 - alpha_bar) w grad log p(y | x_in).
    x, sigma = z() * 2, torch.tensor([2.0, 2.0])
    s = sigma.reshape(-1, 1, 1, 1)
    x_in = (x / (s ** 2 + 1).sqrt()).requires_grad_(True)
    t = 999 * guided.sigma_to_t(sigma)
    logp = torch.log_softmax(guided.classifier(x_in, t), -1)[torch.arange(2), labels].sum()
    grad = torch.autograd.grad(logp, x_in)[0]
    eps = guided.unet(x_in.detach(), t, labels)[:, :3]
    expected = (x - s * (eps - (1 - 1 / (1 + s ** 2)).sqrt() * 4.0 * grad)).clamp(-1, 1)
    assert torch.allclose(guided(x, sigma, labels), expected, atol=1e-5)
    for name, o in [('amed', {}), ('euler', {}), ('ipndm', dict(max_order=4)), ('dpm', {}), ('dpmpp', dict(max_order=3))]:
        out = solvers.sample(guided, z(), labels, solver=name, num_steps=4, schedule_type='discrete', schedule_rho=1.0,
                             predictor=AMEDPredictor(), **o)
        assert torch.isfinite(out).all()


def test_train_and_sample_cli_with_discrete_heun_teacher(files, monkeypatch):
    monkeypatch.chdir(files)
    r = CliRunner().invoke(train.main, [
        '--dataset_name=imagenet256', '--model_path=adm.pt', '--classifier_path=cls.pt', '--guidance_type=cg',
        '--guidance_rate=2', '--sampler_stu=amed', '--sampler_tea=heun', '--num_steps=3', '--M=1',
        '--schedule_type=discrete', '--schedule_rho=1', '--batch=2', '--total_kimg=0.002', '--no-progress',
        '--outdir=exps'], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    run = os.listdir('exps')[0]
    assert run == '00000-imagenet256-3-4-amed-heun-1-discrete'
    r = CliRunner().invoke(sample.main, ['--predictor_path=0', '--model_path=adm.pt', '--classifier_path=cls.pt',
                                         '--seeds=0-2', '--batch=2', '--outdir=out', '--no-progress'],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert sorted(os.listdir('out/000000')) == ['000000.png', '000001.png', '000002.png']
    r = CliRunner().invoke(sample.main, ['--dataset_name=lsun_bedroom', '--model_path=cm.pt', '--solver=dpm',
                                         '--num_steps=3', '--seeds=0', '--outdir=cm', '--no-progress'],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize('args,word', [
    (['--dataset_name=imagenet256', '--model_path=missing.pt'], 'missing.pt'),
    (['--dataset_name=lsun_bedroom', '--model_path=adm.pt'], 'adm.pt'),
    (['--dataset_name=lsun_bedroom', '--model_path=cm.pt', '--classifier_path=cls.pt'], 'classifier_path'),
    (['--dataset_name=lsun_bedroom', '--model_path=cm.pt', '--use_fp16'], 'CUDA'),
])
def test_bad_input(files, monkeypatch, args, word):
    monkeypatch.chdir(files)
    r = CliRunner().invoke(sample.main, args + ['--solver=euler', '--num_steps=3', '--seeds=0', '--outdir=o',
                                                '--no-progress'], catch_exceptions=False)
    last = r.output.strip().splitlines()[-1]
    assert r.exit_code != 0 and word in last, r.output
    assert not os.path.exists('o')
