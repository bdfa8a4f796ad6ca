"""One interface over open_clip models: load one (:func:`load_vlm`) and split each tower at its last layer.

``load_vlm`` finds the weights offline-first (:mod:`uqvlm.models.weights`: model names, pretrained tags,
checkpoint files, ``hf-hub:`` and ``local-dir:`` sources) and builds the model with open_clip.

``VLM.encode_images`` / ``VLM.encode_texts`` return :class:`~uqvlm.features.Features`: the activations
entering the tower's last layer, the unnormalised embedding the model itself outputs, and the residual
added after the last layer (SigLIP's image tower), so that ``embeddings == activations @ W.T (+ b) (+ r)``.
Activations are captured while running open_clip's own forward (forward hooks on ``nn.Linear`` heads, or
the projection Parameter temporarily removed), never by re-implementing an encoder.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import open_clip
import torch
from open_clip.model import CLIP
from open_clip.timm_model import TimmModel
from open_clip.transformer import TextTransformer, VisionTransformer
from PIL import Image
from torch import Tensor, nn

from uqvlm import hub
from uqvlm.devices import autocast_for, resolve_device
from uqvlm.errors import UqvlmError, WeightsUnavailableError
from uqvlm.features import Features, LastLayer
from uqvlm.models.tiny import register_model_configs
from uqvlm.models.weights import resolve_weights, weights_unavailable

PRECISIONS = ("fp32", "bf16", "fp16")


class UnsupportedModelError(UqvlmError, ValueError):
    """The tower's last layer is not one uqvlm knows how to split off."""


# ----------------------------------------------------------------------------- last-layer specs


@dataclass
class _Head:
    """Where a tower's last layer lives and how to capture its input during open_clip's forward.

    ``param``: a ``[p, D]`` Parameter applied as ``x @ proj`` (``owner.attr``); captured by setting it to
    None for the forward (open_clip then returns the pooled input) and applying it ourselves with the
    very same op. ``linear``: an ``nn.Linear`` captured with a forward hook. ``residual_of``: a module
    whose *input* is added to the last layer's output afterwards (SigLIP's attention-pool MLP branch).
    """

    kind: str
    path: str
    owner: nn.Module | None = None
    attr: str | None = None
    linear: nn.Linear | None = None
    residual_of: nn.Module | None = None
    token: int | None = None

    def last_layer(self) -> LastLayer:
        if self.kind == "param":
            proj = getattr(self.owner, self.attr)
            return LastLayer(proj.detach().T, None)
        bias = None if self.linear.bias is None else self.linear.bias.detach()
        return LastLayer(self.linear.weight.detach(), bias)


def _is_noop(m: nn.Module) -> bool:
    """Modules that are the identity at inference (eval-mode dropout)."""
    return isinstance(m, (nn.Identity, nn.Dropout))


def _linear_or_param_head(owner: nn.Module, attr: str, path: str) -> _Head:
    proj = getattr(owner, attr, None)
    if isinstance(proj, nn.Linear):
        return _Head("linear", path, linear=proj)
    if isinstance(proj, nn.Parameter) and proj.ndim == 2:
        return _Head("param", path, owner=owner, attr=attr)
    raise UnsupportedModelError(
        f"{path} is {type(proj).__name__ if proj is not None else 'None'}; uqvlm needs a linear projection "
        "(a [p, D] Parameter or an nn.Linear) as the last layer of the tower"
    )


def _image_head(model: nn.Module) -> _Head:
    visual = model.visual
    if isinstance(visual, VisionTransformer):
        return _linear_or_param_head(visual, "proj", "visual.proj")

    if isinstance(visual, TimmModel):
        return _timm_head(visual)
    raise UnsupportedModelError(
        f"image tower {type(visual).__name__} is not supported: its last layer is not a module uqvlm can "
        "hook (supported: open_clip VisionTransformer, timm trunks with a linear head, SigLIP attention pool)"
    )


def _timm_head(visual: nn.Module) -> _Head:
    head = list(visual.head.named_children())
    if head:
        name, last = head[-1]
        before_ok = all(_is_noop(m) for _, m in head[:-1])
        if isinstance(last, nn.Linear) and before_ok:
            return _Head("linear", f"visual.head.{name}", linear=last)
        fc2, drop2 = getattr(last, "fc2", None), getattr(last, "drop2", nn.Identity())
        if isinstance(fc2, nn.Linear) and _is_noop(drop2) and before_ok:
            return _Head("linear", f"visual.head.{name}.fc2", linear=fc2)
        raise UnsupportedModelError(
            f"timm image tower head {[n for n, _ in head]} is not supported: it must end in an nn.Linear"
        )

    trunk = visual.trunk
    classifier = trunk.get_classifier() if hasattr(trunk, "get_classifier") else None
    if isinstance(classifier, nn.Linear):
        name = next(n for n, m in trunk.named_modules() if m is classifier)
        return _Head("linear", f"visual.trunk.{name}", linear=classifier)

    pool = getattr(trunk, "attn_pool", None)
    mlp = getattr(pool, "mlp", None) if pool is not None else None
    if mlp is not None and isinstance(getattr(mlp, "fc2", None), nn.Linear):
        # timm AttentionPoolLatent: x = proj(attn); x = x + mlp(norm(x)); x = x[:, 0]; then the trunk's
        # fc_norm / head_drop / head. The embedding is fc2(act) + x only when everything after is a no-op.
        tail = [getattr(trunk, a, nn.Identity()) for a in ("fc_norm", "head_drop", "head")]
        if getattr(pool, "latent_len", 1) != 1:
            raise UnsupportedModelError("attention pool with more than one latent query is not supported")
        if not all(_is_noop(m) for m in tail) or not _is_noop(getattr(mlp, "drop2", nn.Identity())):
            raise UnsupportedModelError(
                "attention-pool tower with a norm or head after the pool is not supported: the embedding "
                "would not be affine in the MLP's fc2 input"
            )
        if classifier is not None and not _is_noop(classifier):
            raise UnsupportedModelError(f"unexpected classifier {type(classifier).__name__} after attn_pool")
        return _Head(
            "linear", "visual.trunk.attn_pool.mlp.fc2", linear=mlp.fc2, residual_of=pool.norm, token=0
        )

    raise UnsupportedModelError(
        f"timm trunk {type(trunk).__name__} has no linear head and no attention-pool MLP to split off"
    )


def _text_head(model: nn.Module) -> _Head:
    if isinstance(model, CLIP):
        return _linear_or_param_head(model, "text_projection", "text_projection")
    text = getattr(model, "text", None)
    if isinstance(text, TextTransformer):
        return _linear_or_param_head(text, "text_projection", "text.text_projection")
    proj = getattr(text, "proj", None)
    if isinstance(proj, nn.Linear):  # open_clip's HFTextEncoder with proj_type="linear"
        return _Head("linear", "text.proj", linear=proj)
    raise UnsupportedModelError(
        f"text tower {type(text).__name__ if text is not None else type(model).__name__} is not supported: "
        "its last layer must be a projection Parameter or an nn.Linear"
    )


@contextlib.contextmanager
def _without_param(owner: nn.Module, attr: str) -> Iterator[nn.Parameter]:
    """Remove ``owner.attr`` for the duration; always put it back, also on errors."""
    param = getattr(owner, attr)
    setattr(owner, attr, None)
    try:
        yield param
    finally:
        setattr(owner, attr, param)


def _first(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _split_forward(head: _Head, forward: Callable[[], Any]) -> Features:
    """Run ``forward`` (open_clip's encoder) once and split its output at the last layer."""
    if head.kind == "param":
        with _without_param(head.owner, head.attr) as proj:
            pooled = _first(forward())
        return Features(pooled, pooled @ proj, None)

    seen: dict[str, list[Tensor]] = {"act": [], "res": []}
    hooks = [head.linear.register_forward_hook(lambda m, args, out: seen["act"].append(args[0]))]
    if head.residual_of is not None:
        hooks.append(head.residual_of.register_forward_pre_hook(lambda m, args: seen["res"].append(args[0])))
    try:
        emb = _first(forward())
    finally:
        for h in hooks:
            h.remove()
    if len(seen["act"]) != 1 or (head.residual_of is not None and len(seen["res"]) != 1):
        raise RuntimeError(f"{head.path} ran {len(seen['act'])} times in one forward; expected once")
    act = seen["act"][0]
    res = seen["res"][0] if seen["res"] else None
    if head.token is not None:  # [B, latent, p] inside the attention pool
        act = act[:, head.token]
        res = None if res is None else res[:, head.token]
    return Features(act, emb, res)


def _compile_subtrees(module: nn.Module, keep: set[nn.Module], compile_kwargs: dict[str, Any]) -> None:
    """Compile, in place, the largest submodules of ``module`` that contain no module of ``keep``."""
    for child in module.children():
        if any(m in keep for m in child.modules()):
            _compile_subtrees(child, keep, compile_kwargs)
        elif any(True for _ in child.parameters()):  # parameter-free modules (dropouts, pools) stay eager
            child.compile(**compile_kwargs)


# ----------------------------------------------------------------------------- the model wrapper


class VLM:
    """An open_clip model split at the last layer of each tower."""

    def __init__(
        self,
        model: nn.Module,
        preprocess: Callable[[Image.Image], Tensor],
        name: str,
        pretrained: str | None,
        *,
        tokenizer_source: str,
        tokenizer_kwargs: dict[str, Any] | None = None,
        device: torch.device | str = "cpu",
        precision: str = "fp32",
        offline_tokenizer: bool = False,
    ) -> None:
        self.model = model.eval()
        self.preprocess = preprocess
        self.name = name
        self.pretrained = pretrained
        self.device = torch.device(device)
        self.precision = precision
        self._tokenizer = None
        self._tokenizer_source = tokenizer_source
        self._tokenizer_kwargs = dict(tokenizer_kwargs or {})
        self._offline_tokenizer = offline_tokenizer
        self._image = _image_head(model)
        self._text = _text_head(model)
        self._memory_format = torch.contiguous_format

    def __repr__(self) -> str:
        return (
            f"VLM({self.name!r}, pretrained={self.pretrained!r}, image_head={self._image.path}, "
            f"text_head={self._text.path}, device={self.device}, precision={self.precision})"
        )

    # -- parameters

    @property
    def logit_scale(self) -> float:
        """The logit scale as stored (log scale): logits use ``exp(logit_scale)``."""
        return float(self.model.logit_scale.detach().float().reshape(-1)[0])

    @property
    def logit_bias(self) -> float | None:
        bias = getattr(self.model, "logit_bias", None)
        return None if bias is None else float(bias.detach().float().reshape(-1)[0])

    @property
    def image_head(self) -> LastLayer:
        """The image tower's last layer (detached views of the model's weights: do not modify in place)."""
        return self._image.last_layer()

    @property
    def text_head(self) -> LastLayer:
        """The text tower's last layer (detached views of the model's weights: do not modify in place)."""
        return self._text.last_layer()

    @property
    def image_head_name(self) -> str:
        return self._image.path

    @property
    def text_head_name(self) -> str:
        return self._text.path

    @property
    def tokenizer(self) -> Callable[..., Tensor]:
        """open_clip's tokenizer, created on first use (SigLIP's lives on the HF hub)."""
        if self._tokenizer is None:
            try:
                with hub.offline_mode(self._offline_tokenizer):
                    self._tokenizer = open_clip.get_tokenizer(
                        self._tokenizer_source, **self._tokenizer_kwargs
                    )
            except ImportError as e:
                raise WeightsUnavailableError(
                    f"the tokenizer of {self.name!r} needs a package that is not installed ({e}); "
                    "install it (e.g. `pip install transformers sentencepiece`) or pass token ids to encode_texts"
                ) from e
            except Exception as e:
                raise WeightsUnavailableError(
                    f"the tokenizer of {self.name!r} ({self._tokenizer_source}) is not available offline ({e}). "
                    "Populate the Hugging Face cache with it on a machine with internet, or pass token ids "
                    "to encode_texts"
                ) from e
        return self._tokenizer

    # -- device and speed

    def to(self, device: str | torch.device) -> VLM:
        """Move the model to ``device`` (``auto``: CUDA when available); every later encoding runs there.
        Returns self."""
        self.device = resolve_device(device)
        self.model.to(self.device)
        return self

    def channels_last(self, enabled: bool = True) -> VLM:
        """Run the image tower on channels-last pixels (faster convolutions on CUDA; same features).
        Returns self."""
        fmt = torch.channels_last if enabled else torch.contiguous_format
        self.model.visual.to(memory_format=fmt)
        self._memory_format = fmt
        return self

    def compile(self, **compile_kwargs: Any) -> VLM:
        """``torch.compile`` the towers in place: every submodule that holds no split point (the last
        layers, and SigLIP's residual input) is compiled, so the activations are still captured by
        open_clip's own forward. ``compile_kwargs`` go to ``torch.compile`` (``mode``, ``backend``, ...).
        The features equal the eager ones up to float round-off. Returns self."""
        keep: set[nn.Module] = set()
        for head in (self._image, self._text):
            keep.update(m for m in (head.owner, head.linear, head.residual_of) if m is not None)
        _compile_subtrees(self.model, keep, compile_kwargs)
        return self

    @torch.no_grad()
    def encode_dummy(self, batch: int) -> None:
        """Encode ``batch`` zero images and full-length token sequences (to probe the memory a batch needs)."""
        size = getattr(self.model.visual, "image_size", None)
        length = getattr(self.model, "context_length", None) or getattr(
            getattr(self.model, "text", None), "context_length", None
        )
        if size is None or not length:
            raise UnsupportedModelError(f"{self.name}: no image_size / context_length to build a dummy batch")
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        self.encode_images(torch.zeros(batch, 3, h, w))
        self.encode_texts(torch.zeros(batch, int(length), dtype=torch.long))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- encoding

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast_for(self.device, self.precision)

    @torch.no_grad()
    def encode_images(self, pixels: Tensor | Sequence[Image.Image]) -> Features:
        """Features of a batch of images: preprocessed pixels [B, 3, H, W], or PIL images.

        The features stay on the model's device (``Features.to`` moves them)."""
        if not isinstance(pixels, Tensor):
            pixels = torch.stack([self.preprocess(im) for im in pixels])
        # Pinned host pixels (a CUDA DataLoader's) copy asynchronously; elsewhere this is a plain copy.
        x = pixels.to(self.device, non_blocking=True)
        if x.ndim == 4:
            x = x.contiguous(memory_format=self._memory_format)
        with self._autocast():
            return _split_forward(self._image, lambda: self.model.encode_image(x))

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str] | str | Tensor) -> Features:
        """Features of a batch of texts: strings (tokenized here) or token ids [B, L] (LongTensor)."""
        if isinstance(texts, str):
            texts = [texts]
        ids = texts if isinstance(texts, Tensor) else self.tokenizer(list(texts))
        ids = ids.to(self.device)
        with self._autocast():
            return _split_forward(self._text, lambda: self.model.encode_text(ids))


# ----------------------------------------------------------------------------- loading


def load_vlm(
    model_name: str,
    pretrained: str | None = None,
    *,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    **open_clip_kwargs: Any,
) -> VLM:
    """Load an open_clip model and split its towers at their last layers.

    Args:
        model_name: an open_clip model name (``ViT-B-32``; ``/`` is accepted for ``-``), or
            ``hf-hub:org/repo`` / ``local-dir:/path`` (then ``pretrained`` is ignored).
        pretrained: a pretrained tag (``laion2b_s34b_b79k``), a checkpoint file, ``hf-hub:org/repo`` or
            ``local-dir:/path`` (the architecture then comes from that source), or None for random init.
        device: ``cpu``, ``cuda``, ``cuda:1`` or ``auto``.
        precision: ``fp32`` | ``bf16`` | ``fp16``; weights stay fp32, encoding uses AMP autocast on CUDA.
        **open_clip_kwargs: passed to ``open_clip.create_model_and_transforms`` (e.g. ``cache_dir``,
            ``force_image_size``, ``force_context_length``, ``image_mean``, ``image_resize_mode``).

    Raises:
        ModelNameError: (a ValueError) unknown model name or pretrained tag, listing close matches.
        WeightsUnavailableError: the weights are not on this machine and cannot be downloaded.
        UnsupportedModelError: a tower's last layer cannot be split off.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = resolve_device(device)
    register_model_configs()
    pretrained = None if pretrained is None else str(pretrained)
    cache_dir = open_clip_kwargs.get("cache_dir")
    src = resolve_weights(model_name, pretrained, cache_dir)

    kwargs = dict(open_clip_kwargs)
    for key, value in src.force_preprocess.items():  # the caller's image_mean etc. take precedence
        if kwargs.get(f"image_{key}") is None:
            kwargs[f"image_{key}"] = value
    if src.offline and "cache_dir" not in kwargs:
        kwargs["cache_dir"] = hub.hub_cache_dir()  # where resolve_weights found the files
    try:
        with hub.offline_mode(src.offline):
            model, _, preprocess = open_clip.create_model_and_transforms(
                src.oc_name, pretrained=src.checkpoint, device=device, precision="fp32", **kwargs
            )
    except (FileNotFoundError, OSError) as e:
        raise weights_unavailable(f"could not load weights for {model_name} ({pretrained}): {e}") from e

    tok_kwargs: dict[str, Any] = {"cache_dir": kwargs["cache_dir"]} if kwargs.get("cache_dir") else {}
    if getattr(model, "context_length", None):  # follows force_context_length too
        tok_kwargs["context_length"] = int(model.context_length)
    return VLM(
        model,
        preprocess,
        model_name,
        pretrained,
        tokenizer_source=src.oc_name,
        tokenizer_kwargs=tok_kwargs,
        device=device,
        precision=precision,
        offline_tokenizer=hub.is_offline(),
    )
