"""Test fixture: an AMED predictor class in the layout of the official code's training/networks.py
(the official code), written for our tests, so that published-format pickles can be made here.
Its source is embedded in the pickles, as NVIDIA's persistence does; it imports only what the
official file imports. ``LEGACY = True`` gives the pre-June-2024 variant."""

import numpy as np
import torch
from torch.nn.functional import silu

from torch_utils import persistence

LEGACY = False


class Linear(torch.nn.Module):
    def __init__(self, in_features, out_features, init='kaiming'):
        super().__init__()
        if init == 'xavier':
            bound = np.sqrt(6 / (in_features + out_features))
            w = (torch.rand(out_features, in_features) * 2 - 1) * bound
        else:
            w = np.sqrt(1 / in_features) * torch.randn(out_features, in_features)
        self.weight = torch.nn.Parameter(w)
        self.bias = torch.nn.Parameter(torch.zeros(out_features))

    def forward(self, x):
        return x @ self.weight.to(x.dtype).t() + self.bias.to(x.dtype)


class PositionalEmbedding(torch.nn.Module):
    def __init__(self, num_channels, max_positions=10000, endpoint=True):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x):
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = x.ger(freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


@persistence.persistent_class
class AMED_predictor(torch.nn.Module):
    def __init__(self, hidden_dim=128, output_dim=1, bottleneck_input_dim=64, bottleneck_output_dim=4,
                 noise_channels=8, embedding_type='positional', dataset_name=None, img_resolution=None,
                 num_steps=None, sampler_stu=None, sampler_tea=None, M=None, guidance_type=None,
                 guidance_rate=None, schedule_type=None, schedule_rho=None, afs=False, scale_dir=0.01,
                 scale_time=0, max_order=None, predict_x0=True, lower_order_final=True):
        super().__init__()
        for k, v in dict(dataset_name=dataset_name, img_resolution=img_resolution, num_steps=num_steps,
                         sampler_stu=sampler_stu, sampler_tea=sampler_tea, M=M, guidance_type=guidance_type,
                         guidance_rate=guidance_rate, schedule_type=schedule_type, schedule_rho=schedule_rho,
                         afs=afs, scale_dir=scale_dir, scale_time=scale_time, max_order=max_order,
                         predict_x0=predict_x0, lower_order_final=lower_order_final).items():
            setattr(self, k, v)
        self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        self.map_layer0 = Linear(noise_channels, noise_channels, init='xavier')
        self.enc_layer0 = Linear(bottleneck_input_dim, hidden_dim)
        self.enc_layer1 = Linear(hidden_dim, bottleneck_output_dim)
        self.fc_r = Linear(bottleneck_output_dim + 2 * noise_channels, output_dim)
        if LEGACY or scale_dir:
            self.fc_scale_dir = Linear(bottleneck_output_dim + 2 * noise_channels, output_dim)
        if scale_time:
            self.fc_scale_time = Linear(bottleneck_output_dim + 2 * noise_channels, output_dim)
        self.sigmoid = torch.nn.Sigmoid()

    def _emb(self, t, batch):
        emb = self.map_noise(t.reshape(1,))
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)
        return silu(self.map_layer0(emb)).repeat(batch, 1)

    def forward(self, unet_bottleneck, t_cur, t_next, class_labels=None):
        b = unet_bottleneck.shape[0]
        emb = torch.cat([self._emb(t_cur, b), self._emb(t_next, b)], dim=1)
        x = self.enc_layer1(silu(self.enc_layer0(unet_bottleneck.reshape(b, -1))))
        out = torch.cat([x, emb], dim=1)
        r = self.sigmoid(self.fc_r(out))
        if LEGACY:
            small = self.sampler_stu == 'dpmpp' and self.predict_x0
            scale_dir = self.sigmoid(self.fc_scale_dir(out)) / (10 if small else 50) + (0.95 if small else 0.99)
            if self.scale_time:
                scale_time = self.sigmoid(self.fc_scale_time(out)) / 2.5 + 0.8
                return r, scale_dir, scale_time
            return r, scale_dir
        outs = [r]
        if self.scale_dir:
            outs.append(self.sigmoid(self.fc_scale_dir(out)) * 2 * self.scale_dir + (1 - self.scale_dir))
        if self.scale_time:
            outs.append(self.sigmoid(self.fc_scale_time(out)) * 2 * self.scale_time + (1 - self.scale_time))
        return outs[0] if len(outs) == 1 else tuple(outs)
