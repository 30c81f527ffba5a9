"""Adam, AdamW and SGD (momentum) steps on torch's fused CPU kernels, without torch.optim's wrapper.

torch.optim's Optimizer imports torch._dynamo (and sympy) on its first ``add_param_group`` and
``step`` — about 0.8 s of CPU and 70 MB of resident memory per process (torch 2.13), more than a
deployment node's whole training round. :class:`FusedOptimizer` calls the kernels torch.optim
itself calls with ``fused=True`` (``torch._fused_adam_``, ``torch._fused_adamw_``,
``torch._fused_sgd_``) on the same state tensors, so its steps equal torch.optim's bit for bit
(tests/test_optim.py compares them over several steps). Only what medchain's training loop uses:
one parameter group, constant betas/eps, no amsgrad/nesterov/dampening/maximize, no state_dict.
"""
from __future__ import annotations

import functools

import torch

OPTIMIZERS = ("adam", "adamw", "sgd")


class FusedOptimizer:
    """One parameter group; ``param_groups[0]["lr"]`` may be changed between steps (as with
    torch.optim). Parameters whose ``.grad`` is None at a step are left alone (as torch.optim)."""

    def __init__(self, params, kind: str, lr: float, weight_decay: float = 0.0, momentum: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if kind not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {kind!r}; choose one of {OPTIMIZERS}")
        self.kind = kind
        self.params = list(params)
        self.param_groups = [{"params": self.params, "lr": lr, "weight_decay": weight_decay,
                              "momentum": momentum, "betas": betas, "eps": eps}]
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self) -> None:
        g = self.param_groups[0]
        params = [p for p in self.params if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        if self.kind == "sgd":
            self._sgd(params, grads, g)
            return
        for p in params:
            if p not in self.state:   # torch.optim.Adam's _init_group, fused: a float32 step tensor
                self.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                                 "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                 "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
        st = [self.state[p] for p in params]
        steps = [s["step"] for s in st]
        torch._foreach_add_(steps, 1)
        kernel = torch._fused_adamw_ if self.kind == "adamw" else torch._fused_adam_
        kernel(params, grads, [s["exp_avg"] for s in st], [s["exp_avg_sq"] for s in st], [], steps,
               amsgrad=False, lr=g["lr"], beta1=g["betas"][0], beta2=g["betas"][1],
               weight_decay=g["weight_decay"], eps=g["eps"], maximize=False,
               grad_scale=None, found_inf=None)

    def _sgd(self, params, grads, g) -> None:
        kw = dict(weight_decay=g["weight_decay"], momentum=g["momentum"], lr=g["lr"], dampening=0.0,
                  nesterov=False, maximize=False, grad_scale=None, found_inf=None)
        if g["momentum"] == 0:
            torch._fused_sgd_(params, grads, [], is_first_step=False, **kw)
            return
        # torch.optim.SGD: a parameter's first step fills its new buffer with the gradient
        # (is_first_step=True); later steps update the buffer it kept
        first = [i for i, p in enumerate(params) if p not in self.state]
        later = [i for i, p in enumerate(params) if p in self.state]
        for p in (params[i] for i in first):
            self.state[p] = {"momentum_buffer": torch.empty_like(p.grad)}
        for idx, is_first in ((first, True), (later, False)):
            if idx:
                torch._fused_sgd_([params[i] for i in idx], [grads[i] for i in idx],
                                  [self.state[params[i]]["momentum_buffer"] for i in idx],
                                  is_first_step=is_first, **kw)


@functools.cache
def fused_available(device: str = "cpu") -> bool:
    """Whether this torch build has the fused Adam and SGD kernels for `device` (torch >= 2.4 on CPU)."""
    p = torch.zeros(1, device=device)
    try:
        torch._fused_adam_([p], [p.clone()], [p.clone()], [p.clone()], [], [torch.zeros((), device=device)],
                           amsgrad=False, lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.0, eps=1e-8,
                           maximize=False)
        torch._fused_sgd_([p], [p.clone()], [p.clone()], weight_decay=0.0, momentum=0.9, lr=1e-3,
                          dampening=0.0, nesterov=False, maximize=False, is_first_step=True)
    except (AttributeError, RuntimeError, NotImplementedError, TypeError):
        return False
    return True
