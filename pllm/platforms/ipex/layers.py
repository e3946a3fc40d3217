"""The model's layers on IPEX's fused operators, through the hooks
``pllm.models.layers`` documents (a subclass with the same parameters, or a
linear module with the same call signature):

* ``rms_norm``: RMSNorm, with the residual add folded in (``add_rms_norm``);
* ``silu_and_mul``: the gated MLP's activation (``silu_mul``);
* ``rotary``: RoPE in place, from the model's own cos/sin tables;
* ``linear``: every ``nn.Linear`` replaced by IPEX's prepacked one
  (``ipex.optimize``: MKL packed GEMM in fp32, oneDNN in bf16); without it,
  the host routing every host platform shares
  (``pllm.platforms.common.host_linear``: MKL-packed weights where torch has
  MKL, else ``weight @ x.T`` up to 128 rows and oneDNN-packed copies beyond;
  a oneDNN-packed LM head).

Which of them a CPU gets is what was measured faster on its instruction set
(``ci/legs/ipex_layers.py`` prints the figures, torch and IPEX in the same
run). On AVX2 (a 2-core AMD EPYC, fp32, SmolLM2-135M's shapes) IPEX's norm,
activation and linear kernels were no faster than torch (rms_norm 0.9-1.2x,
silu_and_mul 0.4-0.8x, linear 0.55-1.15x: its fused kernels are built for
AVX-512 and AMX), and its rotary 1.0-1.55x: only rotary is swapped there.
IPEX's bf16 weight prepack needs AVX-512 (or AVX-NE-CONVERT). On AVX-512 and
AMX every swap is made: those are the instruction sets IPEX's kernels are
written for (not measured on such a CPU by pllm yet: the ipex leg prints the
figures where it runs). ``PLLM_IPEX_LAYERS`` (a comma-separated list of the
names above, ``all`` or ``none``) overrides the choice.
"""

from __future__ import annotations

import logging
import os

from torch import nn

from pllm.models.layers import RMSNorm, RotaryEmbedding, SiluAndMul
from pllm.platforms.common.host import cpu_flags
from pllm.platforms.common.host_linear import use_host_linears
from pllm.platforms.ipex.runtime import ipex

logger = logging.getLogger(__name__)

LAYERS_ENV = "PLLM_IPEX_LAYERS"
ALL_LAYERS = ("rms_norm", "silu_and_mul", "rotary", "linear")
# What measured faster than torch, by the best instruction set the CPU has.
MEASURED_FASTER = {"AVX2": ("rotary",)}


def _functional():
    return ipex().llm.functional


class IPEXRMSNorm(RMSNorm):
    def forward(self, x, residual=None):
        # IPEX's kernels read rows: a column-major product (HostLinear's) takes torch's path.
        if x.dtype != self.weight.dtype or not x.is_contiguous():
            return super().forward(x, residual)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if residual is None:
            return _functional().rms_norm(x2, self.weight, self.eps).view(shape)
        residual = residual.reshape(-1, shape[-1]).contiguous()
        # add_back: residual becomes x + residual, in place.
        out = _functional().add_rms_norm(residual, x2, self.weight, None, self.eps, True)
        return out.view(shape), residual.view(shape)


class IPEXSiluAndMul(SiluAndMul):
    def forward(self, x):
        if not x.is_contiguous():
            return super().forward(x)
        half = x.shape[-1] // 2
        return _functional().silu_mul(x[..., :half], x[..., half:])


class IPEXRotaryEmbedding(RotaryEmbedding):
    def forward(self, positions, q, k):
        if self.head_dim % 2 or q.dim() != 3 or self.rotary_dim != self.head_dim:
            return super().forward(positions, q, k)
        # In place on each token's head vectors: views of the QKV product get rows of their own.
        q = q if q.is_contiguous() else q.contiguous()
        k = k if k.is_contiguous() else k.contiguous()
        cos, sin = self.cos[positions], self.sin[positions]  # [tokens, head_dim / 2]: rotate-half
        return _functional().rotary_embedding(q, k, sin, cos, self.head_dim, True)


_SWAPS = {"rms_norm": (RMSNorm, IPEXRMSNorm), "silu_and_mul": (SiluAndMul, IPEXSiluAndMul),
          "rotary": (RotaryEmbedding, IPEXRotaryEmbedding)}


def chosen_layers(best_isa: str | None) -> tuple[str, ...]:
    """The swaps for a CPU whose best instruction set is ``best_isa``
    (``platform.isa``), unless ``PLLM_IPEX_LAYERS`` names them."""
    given = os.environ.get(LAYERS_ENV)
    if given is None:
        return MEASURED_FASTER.get(best_isa, ALL_LAYERS)
    names = tuple(n.strip() for n in given.split(",") if n.strip())
    if names == ("all",):
        return ALL_LAYERS
    if names == ("none",):
        return ()
    unknown = [n for n in names if n not in ALL_LAYERS]
    if unknown:
        raise ValueError(f"{LAYERS_ENV}: unknown layer(s) {', '.join(unknown)}; "
                         f"give some of {', '.join(ALL_LAYERS)}, or all, or none")
    return names


def use_ipex_layers(model: nn.Module, layers: tuple[str, ...] | None = None) -> nn.Module:
    """Give ``model``'s norms, activations and rotary embedding their IPEX
    classes and its linear layers IPEX's prepacked ones (in place), for the
    ``layers`` named (default: ``chosen_layers`` for this CPU)."""
    from pllm.platforms.ipex.platform import isa

    if layers is None:
        layers = chosen_layers(isa(cpu_flags()))
    for name in layers:
        if name in _SWAPS:
            base, cls = _SWAPS[name]
            for module in model.modules():
                if type(module) is base:
                    module.__class__ = cls
    if "linear" in layers and not _prepack_linears(model):
        layers = tuple(n for n in layers if n != "linear")
    if "linear" not in layers:
        use_host_linears(model)
    logger.info("IPEX layers: %s", ", ".join(layers) or "none (torch's own)")
    return model


class _Holder(nn.Module):
    """One linear layer as a model of its own, for ``ipex.optimize`` to pack."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear
        self.eval()


def _untied(linear: nn.Linear) -> nn.Linear:
    """``linear`` with a weight of its own (the bias, never tied, is kept)."""
    copy = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                     device="meta")
    copy.weight = nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
    copy.bias = linear.bias
    return copy


def _prepack_linears(model: nn.Module) -> bool:
    """Every ``nn.Linear`` replaced by IPEX's prepacked module; False (and
    the model's own linears kept) where IPEX cannot pack this dtype here."""
    swaps = []
    # IPEX packs a weight in place: one tied to another module (an LM head
    # sharing the embedding's) is packed from a copy, or the embedding would
    # read the packed layout ("'weight' must be 2-D", seen with bf16 on AVX-512).
    shared = {id(p) for m in model.modules() if type(m) is not nn.Linear
              for p in m.parameters(recurse=False)}
    for module in model.modules():
        for child_name, child in module.named_children():
            if type(child) is nn.Linear:
                if id(child.weight) in shared:
                    child = _untied(child)
                holder = _Holder(child)
                try:
                    # Prepacking only: no folding passes (they trace the module).
                    ipex().optimize(holder, dtype=child.weight.dtype, inplace=True,
                                  conv_bn_folding=False, linear_bn_folding=False,
                                  replace_dropout_with_identity=False, weights_prepack=True)
                    packed = holder.linear
                except (AssertionError, RuntimeError) as exc:  # e.g. bf16 without AVX-512
                    logger.warning("IPEX cannot prepack the linear layers here (%s); "
                                   "keeping torch's", exc)
                    return False
                swaps.append((module, child_name, packed))
    for module, child_name, packed in swaps:
        setattr(module, child_name, packed)
    return True
