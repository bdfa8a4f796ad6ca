"""ProbVLM-style probabilistic embeddings (Upadhyay et al., ICCV 2023) as a post-hoc baseline.

A small adapter per tower ("BayesCap") reads a frozen, L2-normalised embedding x [D] and predicts a
generalised Gaussian per coordinate: location mu, scale alpha > 0 and shape beta > 0, with density

    p(y) = beta / (2 alpha Gamma(1/beta)) * exp(-(|y - mu| / alpha)^beta)

(beta = 2: Gaussian with variance alpha^2 / 2; beta = 1: Laplace with scale alpha). It is trained on
image-caption pairs to reconstruct its own frozen embedding and, weakly, the paired embedding of the other
tower (:func:`probvlm_loss`). For zero-shot classification the image and the class-prompt embeddings become
random vectors with these distributions and the cosine logits are averaged over them, either by sampling
(:func:`probvlm_log_probs_mc`) or by BayesVLM's moment-matched ProbCosine plus probit
(:func:`probvlm_log_probs_probit`).

What differs from the published code (ExplainableML/ProbVLM, src/networks.py, src/losses.py) and why:
- the loss is the textbook generalised-Gaussian negative log-density, not the published residual term
  ``clamp(|r| * (1/alpha) * beta)`` (see :func:`generalized_gaussian_nll`), so alpha and beta are the
  parameters of a real distribution and :func:`generalized_gaussian_variance` is its variance;
- the heads give alpha (not 1/alpha) and beta through softplus + eps instead of ReLU (+ eps in the loss):
  ReLU has no gradient below zero, so a head that goes negative is stuck at alpha = 1/eps or beta = eps;
  softplus is smooth, never exactly zero, and the eps floor keeps log(alpha), 1/alpha and lgamma(1/beta)
  finite. ``beta_eps = 0.1`` is the floor the published uncertainty (utils.get_GGuncer) clips beta to;
- the mu head is residual and the last layers of the trunk and of every head start at zero, so before
  training mu = x exactly and (alpha, beta) = (``init_alpha``, 2), a Gaussian centred at the frozen
  embedding: training starts from "nothing changed" rather than a random map;
- both towers see unit vectors (the published forward multiplies the image features by exp(logit_scale),
  ~100, before the adapter): the cosine is what CLIP compares, and unit inputs give both towers one scale;
- dropout draws its masks from an explicit generator, so a fit is reproducible from its seed.

A caveat the objective inherits from ProbVLM: the own-tower term is minimised by mu = x and alpha -> 0, which
the adapter can represent (zero trunk, zero mu head), so with no other term alpha would shrink to its eps
floor. Its scale is set by the cross-modal term (weight ``cross_modal``) and by the dropout noise in mu;
for a Gaussian (beta = 2) with mu = x the balance is alpha^2 = 2 cross_modal / (1 + cross_modal) *
E[(x_text - x_image)^2 | x] per coordinate: the predicted spread tracks the cross-modal residual but
shrinks with the weight (with the published 1e-4, to ~1e-3 per coordinate of a unit vector, where the
zero-shot predictive is indistinguishable from MAP). In the published code the adapter's own imperfect
reconstruction of x sets the scale instead (its loss balances at alpha = beta |mu - x|).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from uqvlm.console import progress
from uqvlm.devices import intra_op_threads
from uqvlm.probcosine import probcosine_logits, probit_log_probs
from uqvlm.validation import check_tensor

__all__ = [
    "TOWERS",
    "STATE_VERSION",
    "BayesCapAdapter",
    "ProbVLMAdapters",
    "generalized_gaussian_nll",
    "generalized_gaussian_nll_loss",
    "generalized_gaussian_variance",
    "sample_generalized_gaussian",
    "temp_comb_loss",
    "probvlm_loss",
    "fit_probvlm",
    "probvlm_moments",
    "probvlm_log_probs_mc",
    "probvlm_log_probs_probit",
    "pair_retrieval_nll",
]

TOWERS = ("image", "text")
STATE_VERSION = 1
Tower = Literal["image", "text"]
Center = Literal["frozen", "adapter"]
# Rows per adapter forward pass at prediction time: bounds the hidden activations' memory.
_PREDICT_CHUNK = 16384
# Captions whose unit embeddings have a cosine above this are one caption (the same text encoded twice).
_SAME_CAPTION_COS = 1.0 - 1e-6


def _inverse_softplus(y: float) -> float:
    """x with softplus(x) = y > 0 (for the heads' initial bias)."""
    return y + math.log(-math.expm1(-y))


def _uniform_init(layer: nn.Linear, generator: torch.Generator | None) -> None:
    """torch's default Linear init, U(+-1/sqrt(fan_in)) for weight and bias, from ``generator``."""
    bound = 1.0 / math.sqrt(layer.in_features)
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=generator)
        layer.bias.uniform_(-bound, bound, generator=generator)


def _zero_last(layer: nn.Linear, bias: float = 0.0) -> None:
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.fill_(bias)


class BayesCapAdapter(nn.Module):
    """Per-coordinate generalised Gaussian (mu, alpha, beta) of a frozen embedding of dim D.

    Trunk (ProbVLM's BayesCap_MLP): ``Linear(D, hidden), ReLU``, then ``layers - 2`` times
    ``Linear(hidden, hidden), ReLU``, a Dropout after the last ReLU, and ``Linear(hidden, D)``, plus the input
    (for ``layers=3`` exactly the published Linear-ReLU, Linear-ReLU-Dropout, Linear). On z = trunk(x) + x
    three heads ``Linear(D, D), ReLU, Linear(D, D)``:
    mu = z + head_mu(z); alpha = softplus(head_alpha(z)) + alpha_eps; beta = softplus(head_beta(z)) + beta_eps.

    ``init_alpha`` (default 1/sqrt(D), the typical size of a coordinate of a unit vector) and beta = 2 are the
    initial outputs, for every input. ``generator`` seeds the initial weights.
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 256,
        layers: int = 3,
        dropout: float = 0.1,
        *,
        alpha_eps: float = 1e-6,
        beta_eps: float = 0.1,
        init_alpha: float | None = None,
        init_beta: float = 2.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if isinstance(layers, bool) or not isinstance(layers, int) or layers < 2:
            raise ValueError(f"layers must be an int >= 2 (input and output layer), got {layers!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if not (alpha_eps >= 0.0 and beta_eps >= 0.0):
            raise ValueError(f"alpha_eps and beta_eps must be >= 0, got {alpha_eps}, {beta_eps}")
        init_alpha = 1.0 / math.sqrt(dim) if init_alpha is None else float(init_alpha)
        if not init_alpha > alpha_eps:
            raise ValueError(f"init_alpha must exceed alpha_eps={alpha_eps}, got {init_alpha}")
        if not init_beta > beta_eps:
            raise ValueError(f"init_beta must exceed beta_eps={beta_eps}, got {init_beta}")
        self.dim, self.hidden, self.layers, self.dropout = dim, hidden, layers, float(dropout)
        self.alpha_eps, self.beta_eps = float(alpha_eps), float(beta_eps)

        widths = [dim] + [hidden] * (layers - 1) + [dim]
        self.trunk = nn.ModuleList(nn.Linear(i, o) for i, o in zip(widths[:-1], widths[1:], strict=True))
        self.mu_head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.alpha_head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        self.beta_head = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                _uniform_init(module, generator)
        _zero_last(self.trunk[-1])
        _zero_last(self.mu_head[-1])
        _zero_last(self.alpha_head[-1], _inverse_softplus(init_alpha - self.alpha_eps))
        _zero_last(self.beta_head[-1], _inverse_softplus(init_beta - self.beta_eps))

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "hidden": self.hidden,
            "layers": self.layers,
            "dropout": self.dropout,
            "alpha_eps": self.alpha_eps,
            "beta_eps": self.beta_eps,
        }

    def _dropout(self, h: Tensor, generator: torch.Generator | None) -> Tensor:
        if not self.training or self.dropout == 0.0:
            return h
        keep = torch.rand(h.shape, generator=generator, device=h.device, dtype=h.dtype) >= self.dropout
        return h * keep / (1.0 - self.dropout)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(mu, alpha, beta), each of the shape of ``x`` [..., D]. In training mode dropout draws its mask
        from ``generator`` (on ``x``'s device)."""
        h = x
        last = len(self.trunk) - 1
        for i, layer in enumerate(self.trunk):
            h = layer(h)
            if i < last:
                h = F.relu(h)
            if i == last - 1:
                h = self._dropout(h, generator)
        z = h + x
        mu = z + self.mu_head(z)
        alpha = F.softplus(self.alpha_head(z)) + self.alpha_eps
        beta = F.softplus(self.beta_head(z)) + self.beta_eps
        return mu, alpha, beta


@dataclass
class ProbVLMAdapters:
    """The fitted pair: one adapter per tower, trained jointly by :func:`fit_probvlm`."""

    image: BayesCapAdapter
    text: BayesCapAdapter

    def __getitem__(self, tower: str) -> BayesCapAdapter:
        if tower not in TOWERS:
            raise ValueError(f"tower must be one of {TOWERS}, got {tower!r}")
        return getattr(self, tower)

    def parameters(self) -> list[nn.Parameter]:
        return [*self.image.parameters(), *self.text.parameters()]

    def train(self, mode: bool = True) -> ProbVLMAdapters:
        self.image.train(mode)
        self.text.train(mode)
        return self

    def eval(self) -> ProbVLMAdapters:
        return self.train(False)

    @property
    def device(self) -> torch.device:
        return next(self.image.parameters()).device

    def to(self, device: torch.device | str) -> ProbVLMAdapters:
        """Moved in place (as nn.Module.to), returned for chaining."""
        self.image.to(device)
        self.text.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors (CPU copies) and hyperparameters, loadable with ``torch.load(weights_only=True)``."""
        if self.image.hyperparameters() != self.text.hyperparameters():
            raise ValueError("the image and text adapters have different hyperparameters")
        state: dict[str, Any] = {"version": STATE_VERSION, "kind": "probvlm", **self.image.hyperparameters()}
        for tower in TOWERS:
            state[tower] = {k: v.detach().cpu().clone() for k, v in self[tower].state_dict().items()}
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> ProbVLMAdapters:
        """Rebuild the adapters (on the CPU, in eval mode) from :meth:`state_dict`."""
        if not isinstance(state, dict):
            raise ValueError("state must be a dict produced by ProbVLMAdapters.state_dict()")
        hyper = ("dim", "hidden", "layers", "dropout", "alpha_eps", "beta_eps")
        missing = [k for k in ("version", "kind", *hyper, *TOWERS) if k not in state]
        if missing:
            raise ValueError(f"state is missing {missing}")
        if state["version"] != STATE_VERSION:
            raise ValueError(f"state has version {state['version']}, expected {STATE_VERSION}")
        if state["kind"] != "probvlm":
            raise ValueError(f"state holds a {state['kind']!r}, not ProbVLM adapters")
        adapters = {}
        for tower in TOWERS:
            adapter = BayesCapAdapter(**{k: state[k] for k in hyper})
            expected = adapter.state_dict()
            given = state[tower]
            if not isinstance(given, dict) or set(given) != set(expected):
                got = sorted(given) if isinstance(given, dict) else type(given).__name__
                raise ValueError(f"state[{tower!r}] must hold the tensors {sorted(expected)}, got {got}")
            for key, tensor in expected.items():
                if not isinstance(given[key], Tensor) or given[key].shape != tensor.shape:
                    shape = tuple(given[key].shape) if isinstance(given[key], Tensor) else type(given[key])
                    raise ValueError(
                        f"state[{tower!r}][{key!r}] has shape {shape}, expected {tuple(tensor.shape)}"
                    )
            adapter.load_state_dict({k: v.to(tensor.dtype) for k, v in given.items()})
            adapters[tower] = adapter.eval()
        return cls(**adapters)


# ---------------------------------------------------------------------------------- generalised Gaussian


def _abs_residual_pow(residual: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """(|residual| / alpha)^beta with a zero (not NaN) gradient where the residual is exactly zero:
    pow's gradient at 0 is infinite for beta < 1 and abs' is 0, and autograd would multiply them."""
    z = residual.abs() / alpha
    positive = z > 0
    return torch.where(positive, torch.where(positive, z, torch.ones_like(z)).pow(beta), torch.zeros_like(z))


def _gg_nll(mu: Tensor, alpha: Tensor, beta: Tensor, target: Tensor) -> Tensor:
    return (
        _abs_residual_pow(target - mu, alpha, beta)
        - torch.log(beta)
        + torch.log(2.0 * alpha)
        + torch.lgamma(beta.reciprocal())
    )


def _check_gg(mu: Tensor, alpha: Tensor, beta: Tensor) -> None:
    for name, t in (("mu", mu), ("alpha", alpha), ("beta", beta)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor")
    if not (alpha > 0).all():
        raise ValueError("alpha (scale) must be positive")
    if not (beta > 0).all():
        raise ValueError("beta (shape) must be positive")


def generalized_gaussian_nll(mu: Tensor, alpha: Tensor, beta: Tensor, target: Tensor) -> Tensor:
    """Elementwise negative log-density of the generalised Gaussian at ``target``:

        (|target - mu| / alpha)^beta - log(beta) + log(2 alpha) + lgamma(1/beta)   (broadcast shapes).

    This is the proper density (it integrates to 1), so the fitted alpha and beta are a distribution's
    parameters. The published ProbVLM loss (GenGaussLoss) scores the residual as
    ``clamp(|r| * (1/alpha) * beta, 1e-4, 1e3)`` instead of ``(|r|/alpha)^beta`` (the textbook line is
    commented out there) and drops log 2; its minimiser is not the maximum-likelihood (alpha, beta).
    """
    _check_gg(mu, alpha, beta)
    return _gg_nll(mu, alpha, beta, target)


def _reduce(values: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    if reduction == "none":
        return values
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def generalized_gaussian_nll_loss(
    mu: Tensor, alpha: Tensor, beta: Tensor, target: Tensor, reduction: str = "mean"
) -> Tensor:
    """:func:`generalized_gaussian_nll` reduced over all elements ('mean', as ProbVLM; 'sum'; 'none')."""
    return _reduce(generalized_gaussian_nll(mu, alpha, beta, target), reduction)


def generalized_gaussian_variance(alpha: Tensor, beta: Tensor) -> Tensor:
    """Variance alpha^2 Gamma(3/beta) / Gamma(1/beta) (in log-gamma form, so large 1/beta cannot overflow)."""
    _check_gg(alpha, alpha, beta)
    return alpha.square() * torch.exp(torch.lgamma(3.0 / beta) - torch.lgamma(1.0 / beta))


def _sample_gg(
    mu: Tensor, alpha: Tensor, beta: Tensor, num_samples: int, generator: torch.Generator | None
) -> Tensor:
    shape = (num_samples, *torch.broadcast_shapes(mu.shape, alpha.shape, beta.shape))
    dtype = torch.promote_types(torch.promote_types(mu.dtype, alpha.dtype), beta.dtype)
    mu, alpha, beta = (t.to(dtype) for t in (mu, alpha, beta))
    concentration = beta.reciprocal().expand(shape).contiguous()
    # torch.distributions.Gamma has no generator argument; its sampler does.
    radius = torch._standard_gamma(concentration, generator=generator).pow(beta.reciprocal())
    sign = torch.randint(0, 2, shape, generator=generator, device=mu.device).to(dtype).mul_(2.0).sub_(1.0)
    return mu + alpha * sign * radius


def sample_generalized_gaussian(
    mu: Tensor,
    alpha: Tensor,
    beta: Tensor,
    num_samples: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``num_samples`` independent draws [num_samples, *shape] of the generalised Gaussian (broadcast shapes).

    Uses that (|y - mu| / alpha)^beta ~ Gamma(1/beta, 1) (change of variables in the density) and that
    the sign of y - mu is a fair coin. ``generator`` must live on the device of the inputs.
    """
    _check_gg(mu, alpha, beta)
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    return _sample_gg(mu, alpha, beta, num_samples, generator)


# ---------------------------------------------------------------------------------- training objective


def temp_comb_loss(
    mu: Tensor, alpha: Tensor, beta: Tensor, target: Tensor, *, t1: float = 1.0, t2: float = 5e-2
) -> Tensor:
    """ProbVLM's TempCombLoss with the textbook density: t1 * mean|mu - target| + t2 * mean GG-NLL.

    The L1 term pins the location to the target early on, when the NLL's gradient in mu is weak (alpha
    large); both means run over all elements (pairs and coordinates), as the published L1Loss and
    GenGaussLoss do.
    """
    return t1 * (mu - target).abs().mean() + t2 * _gg_nll(mu, alpha, beta, target).mean()


def probvlm_loss(
    adapters: ProbVLMAdapters,
    image: Tensor,
    text: Tensor,
    *,
    t1: float = 1.0,
    t2: float = 5e-2,
    cross_modal: float = 1e-4,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The ProbVLM training loss on a batch of paired unit embeddings image [B, D], text [B, D]:

        L(img -> img) + L(txt -> txt) + cross_modal * (L(img -> txt) + L(txt -> img)),

    with L(a -> b) = :func:`temp_comb_loss` of the a-adapter's (mu, alpha, beta) against the frozen b
    embedding: each adapter reconstructs its own input, and its distribution is also scored, weakly, at the
    paired embedding of the other tower (the published train_probVLM, which adds the same two cross terms).
    ``generator`` draws the dropout masks (used when the adapters are in training mode).
    """
    img_params = adapters.image(image, generator)
    txt_params = adapters.text(text, generator)
    own = temp_comb_loss(*img_params, image, t1=t1, t2=t2) + temp_comb_loss(*txt_params, text, t1=t1, t2=t2)
    if cross_modal == 0.0:
        return own
    cross = temp_comb_loss(*img_params, text, t1=t1, t2=t2) + temp_comb_loss(*txt_params, image, t1=t1, t2=t2)
    return own + cross_modal * cross


def _paired_unit_embeddings(image_emb: Tensor, text_emb: Tensor) -> None:
    check_tensor("image_emb", image_emb, 2)
    check_tensor("text_emb", text_emb, 2)
    if image_emb.shape != text_emb.shape:
        raise ValueError(
            f"image_emb and text_emb must be paired rows of one dim, got {tuple(image_emb.shape)} "
            f"and {tuple(text_emb.shape)}"
        )
    if image_emb.shape[0] < 1:
        raise ValueError("image_emb holds no pairs")


def _derived_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded from ``generator`` (or from torch's global RNG when None)."""
    if generator is None:
        seed = int(torch.randint(0, 2**62, ()))
    else:
        seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
    return torch.Generator(device=device).manual_seed(seed)


def _one_cpu_thread(device: torch.device) -> contextlib.AbstractContextManager:
    """One intra-op thread for CPU training: every op of an adapter step is small (see
    uqvlm.devices.intra_op_threads; 2 s instead of 40 s for 6,000 pairs at D=32 on a busy 2-core machine)."""
    return intra_op_threads(1) if device.type == "cpu" else contextlib.nullcontext()


def fit_probvlm(
    image_emb: Tensor,
    text_emb: Tensor,
    *,
    hidden: int = 64,
    layers: int = 3,
    dropout: float = 0.1,
    lr: float = 2e-3,
    epochs: int = 20,
    batch_size: int = 256,
    t1: float = 1.0,
    t2: float = 5e-2,
    cross_modal: float = 1e-4,
    alpha_eps: float = 1e-6,
    beta_eps: float = 0.1,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    show_progress: bool | None = None,
) -> tuple[ProbVLMAdapters, list[float]]:
    """Train the image and text adapters on cached embeddings of image-caption pairs.

    image_emb, text_emb: [N, D] embeddings of N pairs (row i of each is one pair); they are L2-normalised
    here (a no-op for unit vectors), since the cosine is what CLIP compares. Minibatch Adam on
    :func:`probvlm_loss`, reshuffled every epoch. ``generator`` (any device) seeds the initial weights, the
    shuffles and the dropout masks: on the CPU a fit is deterministic. ``device`` defaults to the inputs'.

    Returns the adapters (on ``device``, in eval mode) and the mean training loss of every epoch.

    ``cross_modal`` sets the scale of the learned spread (see the module docstring): with the published
    1e-4 it ends near 1e-3 per coordinate and the predictives are all but MAP.

    Defaults are sized for small feature sets: 6,000 pairs at D=32 train in 2-3 s on one CPU thread
    (480 steps). Paper scale on the CPU costs ~35 ms per step at D=512, hidden 256, batch 64. ProbVLM's
    published defaults (train_ProbVLM, BayesCap_for_CLIP) are ``lr=1e-4, epochs=100, hidden=256, layers=3,
    dropout=0.1, t1=1, t2=5e-2, cross_modal=1e-4`` (their README: lr 8e-5, 500 epochs, t2=1e-4, batch 64),
    on CLIP ViT-B/32 (D=512); the loss weights here are theirs.
    """
    _paired_unit_embeddings(image_emb, text_emb)
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    for name, value in (("t1", t1), ("t2", t2), ("cross_modal", cross_modal)):
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    device = image_emb.device if device is None else torch.device(device)
    image = F.normalize(image_emb.detach().to(device=device, dtype=torch.float32), dim=-1)
    text = F.normalize(text_emb.detach().to(device=device, dtype=torch.float32), dim=-1)
    n, dim = image.shape

    cpu_gen = _derived_generator(generator, torch.device("cpu"))
    dropout_gen = _derived_generator(generator, device)

    def adapter() -> BayesCapAdapter:
        return BayesCapAdapter(
            dim, hidden, layers, dropout, alpha_eps=alpha_eps, beta_eps=beta_eps, generator=cpu_gen
        ).to(device)

    adapters = ProbVLMAdapters(image=adapter(), text=adapter())
    adapters.train()
    optimizer = torch.optim.Adam(adapters.parameters(), lr=lr, foreach=True)
    steps_per_epoch = math.ceil(n / batch_size)
    if show_progress is None:
        show_progress = epochs * steps_per_epoch >= 5000

    history: list[float] = []

    def run_epochs(advance) -> None:
        for epoch in range(epochs):
            order = torch.randperm(n, generator=cpu_gen).to(device)
            total = torch.zeros((), device=device, dtype=torch.float64)
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                loss = probvlm_loss(
                    adapters,
                    image[idx],
                    text[idx],
                    t1=t1,
                    t2=t2,
                    cross_modal=cross_modal,
                    generator=dropout_gen,
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.detach() * idx.numel()
            mean = float(total) / n
            if not math.isfinite(mean):
                raise FloatingPointError(
                    f"ProbVLM training diverged in epoch {epoch + 1} (loss {mean}); lower lr"
                )
            history.append(mean)
            advance(mean)

    with _one_cpu_thread(device):
        if show_progress:
            with progress() as bar:
                task = bar.add_task("ProbVLM adapters", total=epochs)
                run_epochs(
                    lambda loss: bar.update(task, advance=1, description=f"ProbVLM adapters {loss:.4g}")
                )
        else:
            run_epochs(lambda loss: None)
    return adapters.eval(), history


# ---------------------------------------------------------------------------------- predictives


@torch.no_grad()
def _embedding_distribution(
    adapters: ProbVLMAdapters, emb: Tensor, tower: str, center: str
) -> tuple[Tensor, Tensor, Tensor]:
    """(location, alpha, beta) [N, D] in float64 on ``emb``'s device, the adapter in eval mode."""
    adapter = adapters[tower]
    check_tensor(f"{tower} embeddings", emb, 2)
    if emb.shape[1] != adapter.dim:
        raise ValueError(f"{tower} embeddings have dim {emb.shape[1]}, the adapter expects {adapter.dim}")
    if center not in ("frozen", "adapter"):
        raise ValueError(f"center must be 'frozen' or 'adapter', got {center!r}")
    param = next(adapter.parameters())
    was_training = adapter.training
    adapter.eval()
    try:
        unit = F.normalize(emb.to(device=param.device, dtype=param.dtype), dim=-1)
        parts = [adapter(chunk) for chunk in unit.split(_PREDICT_CHUNK)]
    finally:
        adapter.train(was_training)
    mu, alpha, beta = (
        torch.cat(p).to(device=emb.device, dtype=torch.float64) for p in zip(*parts, strict=True)
    )
    loc = F.normalize(emb.to(torch.float64), dim=-1) if center == "frozen" else mu
    return loc, alpha, beta


def probvlm_moments(
    adapters: ProbVLMAdapters, emb: Tensor, tower: Tower, center: Center = "frozen"
) -> tuple[Tensor, Tensor]:
    """Mean [N, D] and per-coordinate variance [N, D] (float64) of the random embedding of each row of emb.

    ``emb`` may be unnormalised: it is L2-normalised first, as in training, so the moments live in the
    unit-sphere coordinates the adapters were fitted in. ``center="frozen"`` (default) takes the mean to
    be the frozen unit embedding itself, as BayesVLM's posterior mean is the pre-trained weight: with
    vanishing variance the predictive is then exactly the deterministic model's (MAP), so every difference
    from MAP is what the predicted uncertainty adds (with variance, ProbCosine's E[cos] is still shrunk
    by sqrt(S_g S_h), as for BayesVLM). ``center="adapter"`` takes the adapter's mu instead.
    """
    loc, alpha, beta = _embedding_distribution(adapters, emb, tower, center)
    return loc, generalized_gaussian_variance(alpha, beta)


def _check_classification(image_emb: Tensor, class_emb: Tensor, logit_scale: float) -> float:
    check_tensor("image_emb", image_emb, 2)
    check_tensor("class_emb", class_emb, 2)
    if image_emb.shape[1] != class_emb.shape[1]:
        raise ValueError(f"class_emb has dim {class_emb.shape[1]}, image_emb has {image_emb.shape[1]}")
    scale = math.exp(float(logit_scale))
    if not math.isfinite(scale):
        raise ValueError(f"logit_scale must be a finite log scale, got {logit_scale}")
    return scale


def probvlm_log_probs_mc(
    adapters: ProbVLMAdapters,
    image_emb: Tensor,
    class_emb: Tensor,
    logit_scale: float,
    logit_bias: float | None = None,
    *,
    samples: int = 100,
    generator: torch.Generator | None = None,
    center: Center = "frozen",
) -> Tensor:
    """Monte Carlo zero-shot predictive, log p [N, K] in float64.

    Images [N, D] and class prompts [K, D] (unnormalised or normalised: both are L2-normalised first) become
    generalised-Gaussian random embeddings (:func:`probvlm_moments` for ``center``); each of ``samples``
    rounds draws one embedding per image and one per class (images first, then classes, from
    ``generator``, which must live on the inputs' device), forms the logits exp(logit_scale) * cos (+
    logit_bias), and the result is log mean_s softmax, accumulated as a log-sum-exp of log-softmaxes so a
    class the predictive all but rules out keeps a finite log-probability. The class samples are shared by
    all images of a round (each image's predictive is still unbiased). Memory O(N K + (N + K) D).
    """
    scale = _check_classification(image_emb, class_emb, logit_scale)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    img = _embedding_distribution(adapters, image_emb, "image", center)
    cls = _embedding_distribution(adapters, class_emb.to(image_emb.device), "text", center)
    total = None
    for _ in range(samples):
        g = F.normalize(_sample_gg(*img, 1, generator)[0], dim=-1)
        h = F.normalize(_sample_gg(*cls, 1, generator)[0], dim=-1)
        logits = scale * (g @ h.T)
        if logit_bias is not None:
            logits = logits + float(logit_bias)
        part = torch.log_softmax(logits, dim=-1)
        total = part if total is None else torch.logaddexp(total, part)
    return total - math.log(samples)


def probvlm_log_probs_probit(
    adapters: ProbVLMAdapters,
    image_emb: Tensor,
    class_emb: Tensor,
    logit_scale: float,
    logit_bias: float | None = None,
    *,
    center: Center = "frozen",
) -> Tensor:
    """Moment-matched zero-shot predictive, log p [N, K] in float64: the generalised-Gaussian means and
    variances (:func:`probvlm_moments`) go through ProbCosine and the probit approximation exactly as
    BayesVLM's Laplace variances do (:func:`uqvlm.probcosine.probcosine_logits`, :func:`probit_log_probs`).
    Inputs may be unnormalised (they are L2-normalised first)."""
    _check_classification(image_emb, class_emb, logit_scale)
    img_mean, img_var = probvlm_moments(adapters, image_emb, "image", center)
    cls_mean, cls_var = probvlm_moments(adapters, class_emb.to(image_emb.device), "text", center)
    mean, var = probcosine_logits(img_mean, img_var, cls_mean, cls_var, logit_scale, logit_bias)
    return probit_log_probs(mean, var)


def pair_retrieval_nll(
    log_probs: Callable[[Tensor, Tensor], Tensor], image_emb: Tensor, text_emb: Tensor, *, batch: int = 256
) -> float:
    """Mean negative log-probability of each image's own caption among the captions of its batch.

    The pairs (row i of ``image_emb`` with row i of ``text_emb``) are cut into consecutive batches of
    ``batch``; in each, ``log_probs(images, captions)`` (a zero-shot predictive, log p [B, B]) classifies
    every image among the batch's captions, and the image's label is its own caption. A caption that occurs
    twice in a batch (unit embeddings equal to 1e-6 in cosine: the same text) is one answer, so the
    probability of the label is summed over its copies. Needs only the pairing, no class labels: a
    label-free criterion for what a zero-shot predictive built from image-caption pairs should do.
    """
    _paired_unit_embeddings(image_emb, text_emb)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 2:
        raise ValueError(f"batch must be an int >= 2, got {batch!r}")
    total, count = 0.0, 0
    for start in range(0, image_emb.shape[0], batch):
        images, captions = image_emb[start : start + batch], text_emb[start : start + batch]
        if len(images) < 2:  # a last batch of one pair has nothing to tell apart
            continue
        unit = F.normalize(captions.double(), dim=-1)
        same = (unit @ unit.T) > _SAME_CAPTION_COS
        lp = log_probs(images, captions).double()
        total += float(-lp.masked_fill(~same.to(lp.device), -math.inf).logsumexp(1).sum())
        count += len(images)
    if count == 0:
        raise ValueError("pair_retrieval_nll needs at least two pairs")
    return total / count
