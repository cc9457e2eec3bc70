"""The one denoiser interface that every pretrained family is adapted to.

Everything outside ``models/`` sees a model only through :class:`Denoiser`:

* ``model(x, sigma, cond=None) -> D(x; sigma)``: the denoised image in EDM/VE sigma space.
  ``x`` has shape (B, C, H, W); ``sigma`` is a tensor of shape (B,) (one noise level per sample);
  ``cond`` is the conditioning (class labels, text embeddings) or None.
* ``sigma_min``, ``sigma_max``: the noise range the model supports.
* ``dataset_name``: the preset it was loaded as (set by :func:`models.presets.load_model`; None
  for a model built directly). Predictors record it and are checked against it.
* ``img_channels``, ``img_resolution`` (and ``img_shape``); ``label_dim`` (0 = unconditional).
* ``calls_per_eval``: network calls one denoise costs (2 with classifier-free guidance).
* ``latent``: True when x are latents (decoded by ``decode``); dynamic thresholding is then off by
  default.
* ``sigma_to_t`` / ``t_to_sigma``: the continuous-time maps of a discrete-time model, used by
  the ``discrete`` schedule (None for continuous-time models).
* ``feature_module``: the submodule whose output (B, C', 8, 8) feeds the AMED predictor.
* ``amed_feature(activation)``: reduces that output to (B, 8, 8) (channel mean by default);
  ``feature_shape`` is the shape of one reduced feature, (8, 8) (the zero feature of AFS steps).
* ``sample_cond(rnd, batch_size, training=False)``: conditioning drawn from a per-seed generator
  (``rnd.seeds`` are the seeds; text models take caption i for seed i when sampling and a random
  caption when ``training``).
* ``check_seeds(seeds)``: rejects sampling seeds that ``sample_cond`` cannot serve (before anything
  is written).
* ``decode(x)``: latent -> image in [-1, 1] (identity for pixel models).
"""

import contextlib

import torch

from torch_utils.misc import StackedRandomGenerator


class Denoiser(torch.nn.Module):
    """Base class of every model adapter (see the module docstring)."""

    sigma_min = 0.002
    sigma_max = 80.0
    img_channels = 3
    img_resolution = 32
    label_dim = 0
    calls_per_eval = 1
    latent = False
    feature_shape = (8, 8)
    dataset_name = None
    sigma_to_t = None
    t_to_sigma = None
    # ``feature_module`` is a registered submodule of each adapter (not a class attribute here: a
    # class attribute would shadow the submodule in nn.Module's attribute lookup).

    @property
    def img_shape(self):
        return (self.img_channels, self.img_resolution, self.img_resolution)

    def forward(self, x, sigma, cond=None):  # pragma: no cover - abstract
        raise NotImplementedError

    def amed_feature(self, activation):
        """Reduce the hooked activation (B, C', 8, 8) to the predictor input (B, 8, 8)."""
        return activation.float().mean(dim=1)

    def sample_cond(self, rnd, batch_size, training=False):
        """Conditioning for ``batch_size`` images from a per-seed generator (None if unconditional)."""
        return None

    def check_seeds(self, seeds):
        """Raise ValueError (one line) when ``sample_cond`` cannot serve these sampling seeds."""

    def decode(self, x):
        return x

    @contextlib.contextmanager
    def capture_feature(self):
        """Context manager: hooks ``feature_module`` and yields a dict whose key 'feature' holds
        the reduced (B, 8, 8) feature of the last forward call. The hook is always removed."""
        module = getattr(self, 'feature_module', None)
        if module is None:
            raise ValueError(f'{type(self).__name__} names no feature_module for the AMED predictor')
        holder = {}

        def hook(module, inputs, output):
            holder['feature'] = self.amed_feature(output.detach())

        handle = module.register_forward_hook(hook)
        try:
            yield holder
        finally:
            handle.remove()


def seeded_inputs(model, seeds, device=torch.device('cpu'), training=False):
    """(latents, cond) of per-sample ``seeds``: unit-variance latents of ``model.img_shape`` and the
    model's conditioning, both drawn from one generator per seed (EDM's StackedRandomGenerator), so
    a sample depends only on its seed. ``training``: conditioning for training (e.g. prompts drawn
    from the whole caption set instead of caption i for seed i). The one draw that sampling,
    training, the card calibration and the evaluation share."""
    seeds = list(seeds)
    rnd = StackedRandomGenerator(device, seeds)
    latents = rnd.randn([len(seeds), *model.img_shape])
    cond = model.sample_cond(rnd, len(seeds), training=True) if training else model.sample_cond(rnd, len(seeds))
    return latents, cond
