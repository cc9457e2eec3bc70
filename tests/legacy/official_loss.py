"""Test fixture: a loss object in the layout of the official training/loss.py (the official code):
its state holds sampler function objects of ``solvers_amed`` and schedule tensors."""

import torch

from torch_utils import persistence
from torch_utils import distributed as dist
import solvers_amed
from solver_utils import get_schedule


@persistence.persistent_class
class AMED_loss:
    def __init__(self, num_steps=4, sampler_stu='amed', sampler_tea='heun', M=1, schedule_type='polynomial',
                 schedule_rho=7, afs=False, max_order=None, sigma_min=0.002, sigma_max=80, predict_x0=True,
                 lower_order_final=True):
        self.num_steps, self.M, self.schedule_type, self.schedule_rho = num_steps, M, schedule_type, schedule_rho
        self.afs, self.max_order, self.sigma_min, self.sigma_max = afs, max_order, sigma_min, sigma_max
        self.predict_x0, self.lower_order_final = predict_x0, lower_order_final
        names = dict(amed='amed_sampler', euler='euler_sampler', ipndm='ipndm_sampler', dpm='dpm_2_sampler',
                     dpmpp='dpm_pp_sampler', heun='heun_sampler')
        self.solver_stu = getattr(solvers_amed, names[sampler_stu])
        self.solver_tea = getattr(solvers_amed, names[sampler_tea])
        self.num_steps_teacher = (M + 1) * (num_steps - 1) + 1
        self.tea_slice = [(M + 1) * k for k in range(1, num_steps)]
        self.t_steps = torch.linspace(sigma_max, sigma_min, num_steps)
        self.buffer_model, self.buffer_t = [torch.zeros(2)], [torch.ones(1)]
