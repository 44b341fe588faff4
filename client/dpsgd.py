"""The DP-SGD gradient without Opacus' per-sample gradient tensors where they are not needed.

DP-SGD (Abadi et al. 2016) replaces a batch's gradient by

    g~ = ( sum_i c_i G_i + N(0, sigma^2 C^2 I) ) / (qN),      c_i = min(1, C / ||G_i||),

where G_i is sample i's gradient over all parameters, C the clipping norm and qN
the expected Poisson batch size. Opacus materialises every G_i (B x parameters
floats) to get ||G_i||; that dominates a step on the CPU and grows with the model.

For a layer y = W a (a convolution is one on unfolded patches), sample i's
weight gradient is G_i = sum_t g_it a_it^T over its T output positions, with
a_it in R^d the input patch and g_it in R^p the loss gradient at the output.
Its squared norm can be computed two ways:

- materialised: form G_i (B p d memory, B T d p multiply-adds), sum its squares;
- ghost norm (Goodfellow 2015; Li et al. 2022):
  ||G_i||^2 = sum_{t,s} (a_it . a_is)(g_it . g_is), B T^2 (d + p) work, B T^2 memory,
  never forming G_i.

*Mixed ghost clipping* (Bu, Mao and Xu, NeurIPS 2022) takes the ghost norm where
its T x T Gram matrices are smaller than the per-sample gradient, 2 T^2 < p d (few
positions, wide layers: a ResNet's late stages), and materialises elsewhere (many
positions: early convolutions). *Book-keeping* (Bu et al. 2023)
then forms the clipped sum sum_i c_i G_i from the kept (a, g) of the same,
single backward pass: the weight gradient of the batch with each sample's output
gradient scaled by c_i (or c-weighted sum of the materialised G_i). That backward
pass asks autograd only for the layer-output gradients, so the ordinary weight
gradients, which DP-SGD throws away, are never computed.

GroupNorm's affine parameters have per-sample gradients sum_hw g * x_hat and
sum_hw g (B x channels): always materialised. Other layers with trainable
parameters are refused when the clipper is built.

Augmentation multiplicity (De et al. 2022): with K views per sample the per-sample
gradient is the mean over its views; since G_i = (1/K) sum_k sum_t g_ikt a_ikt^T,
a sample's K views are simply K T positions of one sample (loss scaled by 1/K).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SUPPORTED = (nn.Conv2d, nn.Linear, nn.GroupNorm)


@dataclass
class _Call:
    module: nn.Module
    activation: Tensor  # the layer's input, detached
    output: Tensor  # the layer's output, still in the graph


class MixedGhostClipper:
    """Per-sample clipped gradient sums for models built of Conv2d, Linear and GroupNorm layers.

    Usage per step::

        with clipper.capture():
            loss = criterion_sum(model(x), y) / views
        norms = clipper.clipped_sum(loss, batch_size, views)   # fills p.grad = sum_i c_i G_i

    ``mode`` "mixed" (default) chooses per layer; "ghost" and "materialise" force one
    way (for tests and benchmarks).
    """

    def __init__(self, model: nn.Module, max_grad_norm: float, mode: str = "mixed") -> None:
        if mode not in ("mixed", "ghost", "materialise"):
            raise ValueError(f"unknown clipping mode '{mode}'")
        self.max_grad_norm = float(max_grad_norm)
        self.mode = mode
        self.layers: list[nn.Module] = []
        for name, module in model.named_modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if not isinstance(module, SUPPORTED):
                raise ValueError(f"layer '{name}' ({type(module).__name__}) has trainable parameters and "
                                 "no per-sample gradient rule (supported: Conv2d, Linear, GroupNorm)")
            if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"):
                raise ValueError(f"layer '{name}': grouped or non-zero-padded convolutions are not supported")
            self.layers.append(module)
        self._calls: list[_Call] = []
        self._capturing = False
        self._handles = [m.register_forward_hook(self._keep) for m in self.layers]

    def _keep(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if self._capturing:
            if any(c.module is module for c in self._calls):
                raise RuntimeError("a layer used twice in one forward pass has no per-sample rule here")
            self._calls.append(_Call(module, inputs[0].detach(), output))

    @contextmanager
    def capture(self) -> Iterator[None]:
        """Keep the inputs and outputs of this forward pass for ``clipped_sum``."""
        self._calls = []
        self._capturing = True
        try:
            yield
        finally:
            self._capturing = False

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def clipped_sum(self, loss: Tensor, batch_size: int, views: int = 1) -> Tensor:
        """Set every parameter's ``.grad`` to sum_i c_i G_i; return the per-sample norms ||G_i|| (B,).

        ``loss`` must be the *sum* over the batch of per-sample losses (divided by ``views``
        when each sample appears as ``views`` consecutive augmented rows).
        """
        calls, self._calls = self._calls, []
        if {id(c.module) for c in calls} != {id(m) for m in self.layers}:
            raise RuntimeError("clipped_sum needs one captured forward pass through every trainable layer")
        grads = torch.autograd.grad(loss, [c.output for c in calls])
        parts = [_layer_part(c.module, c.activation, g, batch_size, views, self.mode) for c, g in zip(calls, grads)]
        norms = torch.stack([p.sq_norm for p in parts]).sum(0).sqrt()
        factors = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for part in parts:
            part.write_clipped_sum(factors)
        return norms


class _LayerPart:
    """One layer's per-sample squared norms, and how to write its clipped sum once factors are known."""

    def __init__(self, sq_norm: Tensor, writers: list) -> None:
        self.sq_norm = sq_norm
        self._writers = writers

    def write_clipped_sum(self, factors: Tensor) -> None:
        for param, fn in self._writers:
            param.grad = fn(factors).reshape(param.shape).to(param.dtype)


def _by_sample(x: Tensor, batch: int, views: int) -> Tensor:
    """(B*K, n, T) -> (B, n, K*T): a sample's views become more positions of the sample."""
    if views == 1:
        return x
    n, t = x.shape[1], x.shape[2]
    return x.view(batch, views, n, t).transpose(1, 2).reshape(batch, n, views * t)


def _repeat(factors: Tensor, views: int) -> Tensor:
    return factors.repeat_interleave(views) if views > 1 else factors


def _layer_part(module: nn.Module, a: Tensor, g: Tensor, batch: int, views: int, mode: str) -> _LayerPart:
    if isinstance(module, nn.GroupNorm):
        return _groupnorm_part(module, a, g, batch, views)
    conv = isinstance(module, nn.Conv2d)
    p = g.shape[1] if conv else g.shape[-1]
    d = module.weight[0].numel()
    t = views * (g[0, 0].numel() if conv else g[0].numel() // p)  # output positions per sample
    ghost = mode == "ghost" or (mode == "mixed" and 2 * t * t < p * d)
    if ghost:
        grad_out = _by_sample(g.flatten(2) if conv else g.reshape(g.shape[0], -1, p).transpose(1, 2), batch, views)
        if conv and _shifted_gram_is_cheaper(module, a, g.shape[2:]):
            gram_a = _shifted_patch_gram(module, a, g.shape[2:], batch, views)
        else:
            if conv:
                patches = F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride)
            else:  # Linear on (BK, d) or (BK, ..., d)
                patches = a.reshape(a.shape[0], -1, d).transpose(1, 2)
            patches = _by_sample(patches, batch, views)  # (B, d, T)
            gram_a = torch.bmm(patches.transpose(1, 2), patches)  # (B, T, T)
        sq = (gram_a * torch.bmm(grad_out.transpose(1, 2), grad_out)).sum((1, 2))

        def weight_sum(c: Tensor) -> Tensor:
            # Book-keeping: the batch's weight gradient with each sample's output gradient scaled by c_i.
            scaled = g * _repeat(c, views).view(-1, *([1] * (g.dim() - 1)))
            if conv:
                return torch.nn.grad.conv2d_weight(a, module.weight.shape, scaled, module.stride, module.padding,
                                                   module.dilation)
            return scaled.reshape(-1, p).t() @ a.reshape(-1, d)
    else:
        per_sample, to_weight = MATERIALISE(module, a, g, batch, views)
        sq = torch.linalg.vector_norm(per_sample, dim=1).square()

        def weight_sum(c: Tensor) -> Tensor:
            return to_weight(c @ per_sample)
    writers: list = [(module.weight, weight_sum)]
    if module.bias is not None and module.bias.requires_grad:
        bias_ps = (g.sum((2, 3)) if conv else g.reshape(g.shape[0], -1, p).sum(1)).view(batch, views, p).sum(1)
        sq = sq + bias_ps.square().sum(1)
        writers.append((module.bias, lambda c: c @ bias_ps))
    return _LayerPart(sq, writers)


def _shifted_gram_is_cheaper(module: nn.Conv2d, a: Tensor, out_hw: torch.Size) -> bool:
    """Whether :func:`_shifted_patch_gram` takes fewer multiply-adds than the Gram of unfolded patches:
    P^2 c + k T^2 against T^2 c k (P padded input positions, T output positions, k kernel taps)."""
    taps = module.kernel_size[0] * module.kernel_size[1]
    padded = (a.shape[2] + 2 * module.padding[0]) * (a.shape[3] + 2 * module.padding[1])
    t = out_hw[0] * out_hw[1]
    return padded * padded * a.shape[1] + taps * t * t < t * t * a.shape[1] * taps


def _shifted_patch_gram(module: nn.Conv2d, a: Tensor, out_hw: torch.Size, batch: int, views: int) -> Tensor:
    """The ghost norm's Gram of input patches (B, KT, KT) without unfolding the patches.

    Patch t holds the padded input at position pos(t) + o for each kernel offset o, so
    (a_t . a_s) = sum_o A[pos(t) + o, pos(s) + o] with A the Gram of the padded input's
    positions (c channels each): one product over P padded positions (P^2 c multiply-adds)
    and k shifted, strided views of A summed, against T^2 c k for the Gram of the unfolded
    patches (each of the c k patch entries of each pair of positions). A sample's K views
    are K blocks of positions, as in :func:`_by_sample`.
    """
    padded = F.pad(a, (module.padding[1], module.padding[1], module.padding[0], module.padding[0]))
    hp, wp = padded.shape[2:]
    flat = _by_sample(padded.flatten(2), batch, views)  # (B, c, K P)
    full = torch.bmm(flat.transpose(1, 2), flat).view(batch, views, hp, wp, views, hp, wp)
    (sh, sw), (dh, dw) = module.stride, module.dilation
    ho, wo = out_hw
    gram = None
    for i in range(module.kernel_size[0]):
        rows = slice(i * dh, i * dh + sh * (ho - 1) + 1, sh)
        for j in range(module.kernel_size[1]):
            cols = slice(j * dw, j * dw + sw * (wo - 1) + 1, sw)
            block = full[:, :, rows, cols, :, rows, cols]
            gram = block.clone() if gram is None else gram.add_(block)
    return gram.reshape(batch, views * ho * wo, views * ho * wo)


PerSample = tuple[Tensor, Callable[[Tensor], Tensor]]


class _PerSampleGrads:
    """Materialised per-sample weight gradients: (B, n) with each sample's views summed, and the map from
    one such row (or a weighted sum of rows) to the weight's shape.

    A stride-1 convolution has two exact kernels, :func:`_grouped_weight_grads` and
    :func:`_shifted_weight_grads`, and which is faster depends on the channel counts in a way no
    simple rule captured: on 2 CPU cores, batch 64 at 16 x 16, 81 to 32 channels (ScatterNet's first conv)
    took 6.4 ms grouped and 3.4 shifted, 64 to 64 channels 3.9 and 4.9, 96 to 32 3.3 and 3.2; 3 to 16
    at 64 x 64 6.6 and 19.0 (oneDNN's grouped kernel is fast where the channels are multiples of 32).
    So, as cuDNN's benchmark mode does, each layer times both on its first step (best of three calls
    each, once per process and shape) and keeps the faster; both give the same gradients up to float rounding.
    Only layers with no more output than input channels are tried: there the shifted kernel's buffer
    (k p values per position) is no larger than the input's unfolded patches (k c), and elsewhere the
    grouped call won every case measured (16 to 32 channels at 32 x 32: 2.5 against 6.1 ms).
    """

    def __init__(self) -> None:
        # Both kept for the process (every round builds a new clipper), keyed by the layer's geometry,
        # input shape, views, dtype and device: whether the shifted kernel was the faster, and its buffer
        # (one per thread as well, so that two trainings in threads never share one).
        self._shifted: dict[tuple, bool] = {}
        self._buffers: dict[tuple, Tensor] = {}

    def __call__(self, module: nn.Module, a: Tensor, g: Tensor, batch: int, views: int) -> PerSample:
        if isinstance(module, nn.Conv2d) and module.stride == (1, 1) and module.out_channels <= module.in_channels:
            key = (module.out_channels, module.kernel_size, module.dilation, module.padding, tuple(a.shape[1:]),
                   views, a.dtype, a.device)
            if key not in self._shifted:
                self._shifted[key] = _seconds(lambda: self._shifted_grads(key, module, a, g, batch, views)) < _seconds(
                    lambda: _summed_views(_grouped_weight_grads(module, a, g), batch, views))
                if not self._shifted[key]:  # the trial's buffer is not needed: free it
                    self._buffers.pop((*key, threading.get_ident()), None)
            if self._shifted[key]:
                return self._shifted_grads(key, module, a, g, batch, views)
        n = a.shape[0]
        if isinstance(module, nn.Conv2d):
            grads = _grouped_weight_grads(module, a, g)
        else:
            grads = torch.bmm(g.reshape(n, -1, g.shape[-1]).transpose(1, 2), a.reshape(n, -1, a.shape[-1]))
        return _summed_views(grads, batch, views), lambda v: v

    def _shifted_grads(self, key: tuple, module: nn.Conv2d, a: Tensor, g: Tensor, batch: int, views: int
                       ) -> PerSample:
        key = (*key, threading.get_ident())
        buf = self._buffers.get(key)
        if buf is None or len(buf) < batch:
            # Zeroed once: a Poisson batch varies about its mean, so room for 4 standard deviations more rows
            # (zero-filling the 19 MB of ScatterNet's first layer on every new largest batch cost ~1 ms a step).
            shape = (*module.kernel_size, module.out_channels, views, *a.shape[2:])
            buf = self._buffers[key] = g.new_zeros(batch + 4 * math.isqrt(batch) + 1, *shape)
        return _shifted_weight_grads(module, a, g, batch, views, buf[:batch])


MATERIALISE = _PerSampleGrads()


def _seconds(fn: Callable[[], object], calls: int = 3) -> float:
    """The fastest of ``calls`` timed calls of ``fn`` after one untimed (allocation, kernel set-up)."""
    def synchronise() -> None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    fn()
    best = float("inf")
    for _ in range(calls):
        synchronise()
        start = time.perf_counter()
        fn()
        synchronise()
        best = min(best, time.perf_counter() - start)
    return best


def _summed_views(grads: Tensor, batch: int, views: int) -> Tensor:
    """(B K, ...) per-row gradients -> (B, n), each sample's K views summed."""
    grads = grads.reshape(batch, views, -1)
    return grads.sum(1) if views > 1 else grads.squeeze(1)  # a sum over a dimension of one costs a full pass


def _shifted_weight_grads(module: nn.Conv2d, a: Tensor, g: Tensor, batch: int, views: int, buf: Tensor) -> PerSample:
    """Per-sample weight gradients of a stride-1 convolution as one batched matrix product.

    Sample i's gradient at kernel tap (u, v) is G_i[o, c, u, v] = sum_{y,x} g_i[o, y, x] a_i[c, y + du - ph,
    x + dv - pw] (zero outside the input). With S_uv the output gradient shifted by (ph - du, pw - dv) onto
    the input's grid (zero where it falls off), G_i[o, c, u, v] = sum over input positions of
    S_uv[o] a_i[c]: stacking the k shifted copies gives one (k p x positions) @ (positions x c) product
    per sample, without unfolding the input (k c x positions, the larger when c > p). A sample's K views
    are K blocks of positions, so their sum comes from the same product. ``buf`` (B, kh, kw, p, K, h, w)
    holds the shifted copies; it may be reused from an earlier call of the same shapes, whose writes
    covered the same regions, so only its borders need to be (and stay) zero.
    """
    (kh, kw), (dh, dw), (ph, pw) = module.kernel_size, module.dilation, module.padding
    p, c = module.out_channels, module.in_channels
    (h, w), (ho, wo) = a.shape[2:], g.shape[2:]
    shifted = g.view(batch, views, p, ho, wo).transpose(1, 2)  # (B, p, K, ho, wo)
    for i in range(kh):
        top, bottom = max(0, i * dh - ph), min(h, ho + i * dh - ph)
        for j in range(kw):
            left, right = max(0, j * dw - pw), min(w, wo + j * dw - pw)
            if top < bottom and left < right:
                buf[:, i, j, :, :, top:bottom, left:right] = shifted[..., top - i * dh + ph:bottom - i * dh + ph,
                                                                     left - j * dw + pw:right - j * dw + pw]
    positions = _by_sample(a.flatten(2), batch, views)  # (B, c, K h w)
    grads = torch.bmm(buf.view(batch, kh * kw * p, views * h * w), positions.transpose(1, 2))  # (B, k p, c)
    return grads.view(batch, -1), lambda v: v.view(kh, kw, p, c).permute(2, 3, 0, 1)


def _grouped_weight_grads(module: nn.Conv2d, a: Tensor, g: Tensor) -> Tensor:
    """Every row's weight gradient (N, p, d) from one grouped weight-gradient call with the batch as
    groups (row n's input channels only meet its own output gradient): measured several times faster on
    the CPU than unfold + bmm, which copies every patch."""
    n = a.shape[0]
    p, c_in = module.out_channels, module.in_channels
    weight = g.new_empty(1).expand(n * p, c_in, *module.kernel_size)
    grads = torch.ops.aten.convolution_backward(
        g.reshape(1, n * p, *g.shape[2:]), a.reshape(1, n * c_in, *a.shape[2:]), weight, None,
        module.stride, module.padding, module.dilation, False, [0], n, (False, True, False))[1]
    return grads.view(n, p, -1)


def _groupnorm_part(module: nn.GroupNorm, a: Tensor, g: Tensor, batch: int, views: int) -> _LayerPart:
    """Per-sample gradients of GroupNorm's scale, sum over positions of g * x_hat, and shift, sum of g
    (each (B, C))."""
    rows, channels = g.shape[:2]
    grad_out = g.reshape(rows, channels, -1)
    sq = g.new_zeros(batch)
    writers = []
    for param, per_row in (
        (module.weight, lambda: _sum_of_products(
            grad_out, F.group_norm(a, module.num_groups, eps=module.eps).reshape(rows, channels, -1))),
        (module.bias, lambda: grad_out.sum(2)),
    ):
        if param is not None and param.requires_grad:
            ps = per_row().view(batch, views, -1).sum(1)  # (B, C)
            sq = sq + ps.square().sum(1)
            writers.append((param, lambda c, ps=ps: c @ ps))
    return _LayerPart(sq, writers)


def _sum_of_products(x: Tensor, y: Tensor) -> Tensor:
    """sum_n x[r, c, n] y[r, c, n] (R, C): as batched dot products (einsum) over at most 256 positions,
    where that was the faster (batch 64, 2 CPU cores: 81 channels at 16 x 16 0.31 ms against 0.39 for
    the product and sum, 64 at 16 x 16 0.25 against 0.30); multiplied out and summed over more (32 at
    32 x 32: 2.3 ms against 0.6; 16 at 64 x 64: 4.4 against 1.2)."""
    if x.shape[2] <= 256:
        return torch.einsum("rcn,rcn->rc", x, y)
    return (x * y).sum(2)


def add_noise_and_average(params: list[nn.Parameter], noise_multiplier: float, max_grad_norm: float,
                          expected_batch_size: float, generator: torch.Generator) -> None:
    """g <- (g + N(0, sigma^2 C^2)) / (qN) for every parameter, in place (a parameter without .grad
    is taken as a zero sum: an empty Poisson batch still gets its noise)."""
    std = noise_multiplier * max_grad_norm
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        noise = torch.normal(0.0, std, p.shape, generator=generator, device=p.device) if std > 0 else 0.0
        p.grad = (p.grad + noise) / expected_batch_size
