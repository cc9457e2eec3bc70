"""AMED where users sample: solver cards (:mod:`integrations.card`), a k-diffusion-signature
sampler (:mod:`integrations.kdiffusion`), ComfyUI nodes around it (:mod:`integrations.comfyui`, a
custom-node folder) and a diffusers scheduler (:mod:`integrations.diffusers_scheduler`, needs the
optional ``latent`` extra). All of them adapt interfaces and step with :func:`solvers.step`; none
holds stepping logic of its own."""
