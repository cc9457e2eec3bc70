"""Model presets: ``dataset_name`` -> a loaded :class:`models.base.Denoiser`.

Only ``models/`` knows dataset names. Each preset says how to build the model and which
guidance, classifier and prompt options it takes; anything else is rejected with one line.
Each family's module is imported only when its preset is built: the latent families need the
optional extra (diffusers, transformers), and loading one model should not import them all.
The loaded model's ``dataset_name`` (an attribute of the Denoiser interface) is the preset's name.
"""

import dataclasses
from typing import Callable, Tuple


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    build: Callable            # build(model_path=..., guidance_type=..., guidance_rate=..., classifier_path=...,
                               #       prompt_path=..., use_fp16=..., device=...)
    description: str
    guidance_types: Tuple = (None,)
    takes_model_path: bool = False
    takes_classifier: bool = False
    takes_fp16: bool = False
    takes_prompts: bool = False
    needs: str = ''            # optional packages the preset needs (pip extra 'latent')


def _build_toy(conditional):
    def build(**kwargs):
        from models.toy import GaussianMixture
        return GaussianMixture(seed=0, conditional=conditional)
    return build


def _build_builtin_unet(module):
    def build(model_path=None, **kwargs):
        import importlib
        return importlib.import_module(f'models.{module}').load(model_path)
    return build


def _build_edm(dataset_name):
    def build(model_path=None, **kwargs):
        from models.edm import EDM_URLS, EDMDenoiser, load_edm_pickle
        return EDMDenoiser(load_edm_pickle(model_path or EDM_URLS[dataset_name]))
    return build


def _build_cm(dataset_name):
    def build(model_path=None, use_fp16=False, device='cpu', **kwargs):
        from models.adm import load_cm
        return load_cm(dataset_name, model_path, use_fp16=use_fp16, device=device)
    return build


def _build_adm(model_path=None, guidance_type=None, guidance_rate=None, classifier_path=None, use_fp16=False,
               device='cpu', **kwargs):
    from models.adm import load_adm
    return load_adm(model_path, classifier_path, guidance_type, guidance_rate, use_fp16=use_fp16, device=device)


def _build_ldm(model_path=None, guidance_type=None, guidance_rate=None, use_fp16=False, device='cpu', **kwargs):
    if guidance_rate not in (None, 0, 1):
        raise ValueError('lsun_bedroom_ldm is unconditional: guidance_rate must be 1 (the official recipe) or unset')
    from models.ldm import load_ldm
    return load_ldm(model_path, use_fp16=use_fp16, device=device)


def _build_sd(model_path=None, guidance_type=None, guidance_rate=None, prompt_path=None, prompt=None, use_fp16=False,
              device='cpu', **kwargs):
    from models.stable_diffusion import load_sd
    return load_sd(model_path, guidance_type, guidance_rate, prompt_path=prompt_path, prompt=prompt,
                   use_fp16=use_fp16, device=device)


PRESETS = {
    'toy': Preset('toy', _build_toy(False), 'built-in analytic Gaussian mixture, 3x32x32, unconditional'),
    'toy_cond': Preset('toy_cond', _build_toy(True), 'built-in analytic Gaussian mixture, 3x32x32, 10 classes'),
    'toy_unet': Preset('toy_unet', _build_builtin_unet('toy_unet'), 'built-in learned model: a small EDM U-Net '
                       'trained on the toy mixture, 3x32x32, unconditional (--model_path: another checkpoint with its '
                       'sidecar)', takes_model_path=True),
    'photo_unet': Preset('photo_unet', _build_builtin_unet('photo_unet'), 'built-in learned model of real '
                         'photographs: a small EDM U-Net trained on 32x32 crops of scikit-image\'s sample photographs, '
                         'unconditional (--model_path: another checkpoint with its sidecar)', takes_model_path=True),
    'cifar10': Preset('cifar10', _build_edm('cifar10'), 'EDM CIFAR-10 32x32 unconditional VP', takes_model_path=True),
    'ffhq': Preset('ffhq', _build_edm('ffhq'), 'EDM FFHQ 64x64 unconditional VP', takes_model_path=True),
    'afhqv2': Preset('afhqv2', _build_edm('afhqv2'), 'EDM AFHQv2 64x64 unconditional VP', takes_model_path=True),
    'imagenet64': Preset('imagenet64', _build_edm('imagenet64'), 'EDM ImageNet 64x64 conditional ADM',
                         takes_model_path=True),
    'lsun_bedroom': Preset('lsun_bedroom', _build_cm('lsun_bedroom'), 'Consistency-Models EDM U-Net, LSUN Bedroom 256',
                           takes_model_path=True, takes_fp16=True),
    'lsun_cat': Preset('lsun_cat', _build_cm('lsun_cat'), 'Consistency-Models EDM U-Net, LSUN Cat 256',
                       takes_model_path=True, takes_fp16=True),
    'imagenet256': Preset('imagenet256', _build_adm, 'ADM ImageNet 256, classifier guidance',
                          guidance_types=(None, 'cg'), takes_model_path=True, takes_classifier=True, takes_fp16=True),
    'lsun_bedroom_ldm': Preset('lsun_bedroom_ldm', _build_ldm, 'LDM LSUN Bedroom 256, VQ-f4 latents 3x64x64',
                               guidance_types=(None, 'uncond'), takes_model_path=True, takes_fp16=True,
                               needs='diffusers'),
    'ms_coco': Preset('ms_coco', _build_sd, 'Stable Diffusion v1.x, latents 4x64x64, classifier-free guidance, '
                      'MS-COCO captions', guidance_types=('cfg',), takes_model_path=True, takes_fp16=True,
                      takes_prompts=True, needs='diffusers, transformers'),
}


def _toy_data():
    from models.toy import GaussianMixture
    return GaussianMixture(seed=0)


def _photo_data():
    from models.photo_unet import PhotoCrops
    return PhotoCrops()


#: The data each built-in model was trained on (or is, for the analytic one): what a distribution
#: metric compares its samples with, as FID compares with the training set. Each entry builds an
#: object whose ``sample(n, generator=...)`` draws (n, 3, 32, 32) images in [-1, 1].
TRAINING_DATA = {'toy': _toy_data, 'toy_unet': _toy_data, 'photo_unet': _photo_data}


def training_data(dataset_name):
    """The data source of a built-in model (see :data:`TRAINING_DATA`); ValueError for other models."""
    if dataset_name not in TRAINING_DATA:
        raise ValueError(f"no built-in data for {dataset_name!r} (choose one of {', '.join(sorted(TRAINING_DATA))})")
    return TRAINING_DATA[dataset_name]()


def dataset_names():
    return sorted(PRESETS)


def load_model(dataset_name, model_path=None, guidance_type=None, guidance_rate=None, classifier_path=None,
               prompt_path=None, use_fp16=False, device='cpu', prompt=None):
    """Build the denoiser of ``dataset_name`` on ``device`` (frozen: eval mode, no gradients).

    Raises ValueError with one line for an unknown name or an option the preset does not take."""
    if dataset_name not in PRESETS:
        raise ValueError(f"unknown dataset_name {dataset_name!r} (choose one of {', '.join(dataset_names())})")
    preset = PRESETS[dataset_name]
    if guidance_type not in preset.guidance_types:
        raise ValueError(f'guidance_type {guidance_type!r} is not supported by dataset {dataset_name!r} '
                         f"(choose {' or '.join(str(g) for g in preset.guidance_types)})")
    if guidance_type is None and guidance_rate not in (None, 0, 0.0):
        raise ValueError(f'guidance_rate needs a guidance_type; dataset {dataset_name!r} takes none')
    for opt, val in (('model_path', model_path if not preset.takes_model_path else None),
                     ('classifier_path', classifier_path if not preset.takes_classifier else None),
                     ('prompt_path', prompt_path if not preset.takes_prompts else None),
                     ('prompt', prompt if not preset.takes_prompts else None), ('use_fp16', (use_fp16 or None) if not preset.takes_fp16 else None)):
        if val is not None:
            raise ValueError(f'{opt} is not used by dataset {dataset_name!r}')
    if preset.needs:
        _check_installed(dataset_name, preset.needs)
    model = preset.build(model_path=model_path, guidance_type=guidance_type, guidance_rate=guidance_rate,
                         classifier_path=classifier_path, prompt_path=prompt_path, prompt=prompt, use_fp16=use_fp16,
                         device=device)
    model = model.to(device).eval().requires_grad_(False)
    model.dataset_name = dataset_name
    return model


def _check_installed(dataset_name, needs):
    import importlib.util
    missing = [name.strip() for name in needs.split(',') if importlib.util.find_spec(name.strip()) is None]
    if missing:
        raise ValueError(f"dataset {dataset_name!r} needs {', '.join(missing)}: pip install -r requirements-latent.txt")
