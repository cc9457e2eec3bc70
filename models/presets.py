"""Model presets: ``dataset_name`` -> a loaded :class:`models.base.Denoiser`.

Only ``models/`` knows dataset names. Each preset says how to build the model and which
guidance, classifier and prompt options it takes; anything else is rejected with one line.
"""

import dataclasses
from typing import Callable, Tuple

#: Dataset names of the brief (../shared/BRIEF.md) whose loaders are not part of this build yet.
PENDING = {
    'lsun_bedroom_ldm': 'LDM checkpoints', 'ms_coco': 'Stable Diffusion checkpoints',
}


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


def _build_toy(conditional):
    def build(**kwargs):
        from models.toy import GaussianMixture
        return GaussianMixture(seed=0, conditional=conditional)
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


PRESETS = {
    'toy': Preset('toy', _build_toy(False), 'built-in analytic Gaussian mixture, 3x32x32, unconditional'),
    'toy_cond': Preset('toy_cond', _build_toy(True), 'built-in analytic Gaussian mixture, 3x32x32, 10 classes'),
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
}


def dataset_names():
    return sorted(PRESETS) + sorted(PENDING)


def load_model(dataset_name, model_path=None, guidance_type=None, guidance_rate=None, classifier_path=None,
               prompt_path=None, use_fp16=False, device='cpu'):
    """Build the denoiser of ``dataset_name`` on ``device`` (frozen: eval mode, no gradients).

    Raises ValueError with one line for an unknown name or an option the preset does not take."""
    if dataset_name not in PRESETS:
        if dataset_name in PENDING:
            raise ValueError(f'dataset_name {dataset_name!r} needs the loader for {PENDING[dataset_name]}, '
                             f'which this build does not include yet')
        raise ValueError(f"unknown dataset_name {dataset_name!r} (choose one of {', '.join(dataset_names())})")
    preset = PRESETS[dataset_name]
    if guidance_type not in preset.guidance_types:
        raise ValueError(f'guidance_type {guidance_type!r} is not supported by dataset {dataset_name!r}')
    if guidance_type is None and guidance_rate not in (None, 0, 0.0):
        raise ValueError(f'guidance_rate needs a guidance_type; dataset {dataset_name!r} takes none')
    for opt, val in (('model_path', model_path if not preset.takes_model_path else None),
                     ('classifier_path', classifier_path if not preset.takes_classifier else None),
                     ('prompt_path', prompt_path), ('use_fp16', (use_fp16 or None) if not preset.takes_fp16 else None)):
        if val is not None:
            raise ValueError(f'{opt} is not used by dataset {dataset_name!r}')
    model = preset.build(model_path=model_path, guidance_type=guidance_type, guidance_rate=guidance_rate,
                         classifier_path=classifier_path, prompt_path=prompt_path, use_fp16=use_fp16, device=device)
    model = model.to(device).eval().requires_grad_(False)
    model.dataset_name = dataset_name
    return model
