"""The ComfyUI nodes (see README.md in this folder).

* ``AMEDCardSampler``: a solver card -> ``SAMPLER`` (ComfyUI's ``KSAMPLER`` around
  :func:`integrations.kdiffusion.sample_amed` with the card) and the card's ``SIGMAS``, for
  ``SamplerCustom`` / ``SamplerCustomAdvanced``.
* ``AMEDCardSigmas``: the card's ``SIGMAS`` only, for any sampler (the use of ComfyUI's GITS and
  Align-Your-Steps tables; any card does, a GITS card included).

ComfyUI does what it does for every sampler: it batches cond and uncond, applies CFG, scales the
noise (``noise * sigma`` plus the latent; ``noise * sqrt(1 + sigma^2)`` when the first sigma is the
model's sigma_max) and evaluates its U-Net at the nearest of the model's 1000 training timesteps.
The sampler receives the denoiser and the scaled noise, as every k-diffusion sampler does.
"""

import os

from predictors.card import kdiffusion_sigmas, load_card
from integrations.kdiffusion import sample_amed

CATEGORY = 'sampling/custom_sampling/AMED'

_CARD = ('STRING', {'default': 'card.json', 'multiline': False,
                    'tooltip': 'Solver card (JSON from python -m integrations.card export): a path, absolute or '
                               'relative to the folder ComfyUI runs in'})
_DENOISE = ('FLOAT', {'default': 1.0, 'min': 0.01, 'max': 1.0, 'step': 0.01,
                      'tooltip': "img2img: keep the card's last round(denoise x intervals) intervals"})
_TO_ZERO = ('BOOLEAN', {'default': False,
                        'tooltip': "Append sigma 0: one more model call, the final Euler step to 0 (the card's NFE "
                                   "does not count it); off, the run ends at the card's last sigma as sample.py"})


def card_sigmas(card_path, denoise, step_to_zero):
    """(card, SIGMAS): the card's noise levels (a tail of them for ``denoise`` < 1), float32."""
    card = load_card(os.path.expanduser(card_path))
    return card, kdiffusion_sigmas(card, append_zero=step_to_zero, denoise=denoise)


def check_model(card, model):
    """Refuse (one line) a model whose noise range is not the card's: ``model`` is the denoiser
    ComfyUI's KSAMPLER hands its sampler function, whose model sampling (as KSAMPLER reads it) says
    the range. A card of an SD v1 model on a flow model (sigmas in [0, 1]) or on SDXL's schedule
    would otherwise run, wrongly."""
    sampling = getattr(getattr(getattr(model, 'inner_model', None), 'inner_model', None), 'model_sampling', None)
    made_for = card.get('model', {})
    for key in ('sigma_min', 'sigma_max'):
        theirs, ours = made_for.get(key), getattr(sampling, key, None)
        if theirs is not None and ours is not None and abs(float(ours) - theirs) > 1e-3 * theirs:
            raise ValueError(f'the solver card was made for a model with {key} {theirs:g}; this model has '
                             f'{float(ours):g}')


def sample_card(model, x, sigmas, extra_args=None, callback=None, disable=None, card=None):
    """:func:`integrations.kdiffusion.sample_amed` with the card, after :func:`check_model`."""
    check_model(card, model)
    return sample_amed(model, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, card=card)


def card_sampler(card):
    """ComfyUI's ``KSAMPLER`` running the card (needs ComfyUI's ``comfy`` package)."""
    from comfy.samplers import KSAMPLER  # pylint: disable=import-outside-toplevel
    return KSAMPLER(sample_card, extra_options={'card': card})


class AMEDCardSampler:
    """A solver card as a SAMPLER and its SIGMAS."""

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 (ComfyUI's name)
        return {'required': {'card_path': _CARD, 'denoise': _DENOISE, 'step_to_zero': _TO_ZERO}}

    RETURN_TYPES = ('SAMPLER', 'SIGMAS')
    RETURN_NAMES = ('sampler', 'sigmas')
    FUNCTION = 'load'
    CATEGORY = CATEGORY
    DESCRIPTION = ('AMED solver card: the sampler and its own sigmas, for SamplerCustom / SamplerCustomAdvanced. '
                   'The sampler refuses other sigmas.')

    def load(self, card_path, denoise=1.0, step_to_zero=False):
        card, sigmas = card_sigmas(card_path, denoise, step_to_zero)
        return card_sampler(card), sigmas


class AMEDCardSigmas:
    """A solver card's noise levels as SIGMAS, for any sampler."""

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802
        return {'required': {'card_path': _CARD, 'denoise': _DENOISE,
                             'step_to_zero': ('BOOLEAN', dict(_TO_ZERO[1], default=True))}}

    RETURN_TYPES = ('SIGMAS',)
    RETURN_NAMES = ('sigmas',)
    FUNCTION = 'load'
    CATEGORY = CATEGORY
    DESCRIPTION = "A solver card's t_steps as SIGMAS for any sampler (a static table, like GITS or Align Your Steps)."

    def load(self, card_path, denoise=1.0, step_to_zero=True):
        return (card_sigmas(card_path, denoise, step_to_zero)[1],)


NODE_CLASS_MAPPINGS = {'AMEDCardSampler': AMEDCardSampler, 'AMEDCardSigmas': AMEDCardSigmas}
NODE_DISPLAY_NAME_MAPPINGS = {'AMEDCardSampler': 'AMED Solver Card (sampler + sigmas)',
                              'AMEDCardSigmas': 'AMED Solver Card Sigmas'}
