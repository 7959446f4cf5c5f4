"""Hugging Face causal LMs: the training loss through ``linear_cross_entropy``, never the [tokens, vocab] logits.

    from karma_kernels.integrations.transformers import patch
    patch(model)                     # any *ForCausalLM / *LMHeadModel instance with a linear LM head

After ``patch(model)``, a forward call with ``labels`` returns the model's own output class with ``loss`` computed
by the fused op and ``logits=None`` (``patch(model, return_logits=True)`` keeps them, at their usual memory
cost). A call without ``labels`` (inference, ``generate``) runs the original forward untouched. ``unpatch(model)``
restores it; ``with patched(model): ...`` does both.

How. The model's own forward still runs (every architecture's arguments, caches, ``logits_to_keep`` slicing,
gradient checkpointing and output class stay its own), with ``labels`` withheld. A forward pre-hook on the LM head,
present only during that call, records the head's input (the final hidden states after ``logits_to_keep``)
and hands the head only the last position, so the head projects one position per sequence instead of all. The
loss then follows transformers' ``ForCausalLMLoss`` exactly:

    shift_labels = pad(labels, (0, 1), value=ignore_index)[..., 1:]     (or the ``shift_labels`` passed in)
    loss = CE(softcap(hidden @ W.T + b), shift_labels), ignore_index    (W, b: the LM head's; tied or not)
    reduction: mean over non-ignored tokens, or sum / ``num_items_in_batch`` when the Trainer passes it

The shift moves the (small, integer) labels, not the hidden states, so nothing of size [tokens, hidden] is
copied. ``softcap`` is the config's ``final_logit_softcapping`` (Gemma 2/3). Heads that transform their logits
in other ways (a logit scale, a final-logits bias, a padded vocabulary) are refused at ``patch`` time.

Only the model instance is patched (its ``forward`` attribute), never the class, and nothing happens at import.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .._backend import BACKENDS
from ..linear_ce.op import linear_cross_entropy

_OP = "karma_kernels.integrations.transformers.patch"
_STATE = "_karma_fused_loss_state"
# Keyword arguments that transformers routes to the loss function, not to the backbone.
_LOSS_KWARGS = ("num_items_in_batch", "ignore_index", "shift_labels")
# Config fields (of the text config) and model attributes whose head does more than `lm_head` (+ softcap).
_UNSUPPORTED_CONFIG = ("logits_scaling", "logit_scale", "unpadded_vocab_size")
_UNSUPPORTED_ATTRS = ("logit_scale", "final_logits_bias")


@dataclass
class _PatchState:
    original_forward: object  # what model.forward was before patching (bound method or instance attribute)
    had_instance_forward: bool
    signature: inspect.Signature
    softcap: Optional[float]
    return_logits: bool
    backend: str


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"{_OP}: expected a transformers PreTrainedModel (with .config), got {type(model).__name__}")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _lm_head(model: nn.Module) -> nn.Linear:
    head = getattr(model, "lm_head", None)
    if head is None and hasattr(model, "get_output_embeddings"):
        head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{_OP}: model must be a causal LM with a linear LM head (model.lm_head: nn.Linear), "
                        f"got {type(model).__name__} with head {type(head).__name__}")
    return head


def _check_supported(model: nn.Module, config) -> None:
    for name in _UNSUPPORTED_CONFIG:
        value = getattr(config, name, None)
        if value is not None and value != 1:
            raise ValueError(f"{_OP}: {type(model).__name__} has config.{name}={value!r}; its logits are transformed "
                             "beyond lm_head + final_logit_softcapping, which the fused loss does not reproduce")
    for name in _UNSUPPORTED_ATTRS:
        if getattr(model, name, None) is not None:
            raise ValueError(f"{_OP}: {type(model).__name__} has a {name!r} applied to its logits; the fused loss "
                             "does not reproduce it")


def _var_keyword_name(signature: inspect.Signature) -> Optional[str]:
    for parameter in signature.parameters.values():
        if parameter.kind == inspect.Parameter.VAR_KEYWORD:
            return parameter.name
    return None


def _call_arguments(signature: inspect.Signature, args, kwargs) -> dict:
    """Every argument of a forward call by name (positional ones included), **kwargs merged in."""
    bound = signature.bind_partial(*args, **kwargs)
    arguments = dict(bound.arguments)
    var_keyword = _var_keyword_name(signature)
    if var_keyword is not None:
        arguments.update(arguments.pop(var_keyword, {}))
    return arguments


def causal_lm_loss(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, *, ignore_index: int = -100,
                   num_items_in_batch=None, shift_labels: Optional[torch.Tensor] = None,
                   softcap: Optional[float] = None, backend: str = "auto") -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` on ``head(hidden)`` without the logits (see the module docstring).

    hidden [..., D] are the states the head would project (one per label position); labels are unshifted, as
    passed to the model, unless ``shift_labels`` (already shifted) is given.
    """
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    target = shift_labels.reshape(-1).to(hidden.device)
    states = hidden.reshape(-1, hidden.shape[-1])
    if target.shape[0] != states.shape[0]:
        raise ValueError(f"{_OP}: labels give {target.shape[0]} targets but the LM head receives "
                         f"{states.shape[0]} positions (labels {tuple(labels.shape)}, hidden {tuple(hidden.shape)}); "
                         "with logits_to_keep, pass labels for the kept positions only")
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = linear_cross_entropy(states, head.weight, target, bias=head.bias, ignore_index=ignore_index,
                                reduction=reduction, softcap=softcap, backend=backend)
    if num_items_in_batch is not None:
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    return loss


def _fused_forward(model: nn.Module, state: _PatchState, *args, **kwargs):
    arguments = _call_arguments(state.signature, args, kwargs)
    labels = arguments.pop("labels", None)
    if labels is None:
        return state.original_forward(*args, **kwargs)
    loss_kwargs = {name: arguments.pop(name) for name in _LOSS_KWARGS if name in arguments}
    return_dict = arguments.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)

    head = _lm_head(model)
    captured = []

    def record_head_input(module, head_args):
        hidden = head_args[0]
        captured.append(hidden)
        if state.return_logits:
            return None
        # the logits are not needed: project one position per sequence (the output shape stays valid)
        return (hidden[..., -1:, :],) + tuple(head_args[1:])

    handle = head.register_forward_pre_hook(record_head_input)
    try:
        output = state.original_forward(**arguments, return_dict=True)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"{_OP}: expected {type(model).__name__}.forward to call its LM head once, it called it "
                           f"{len(captured)} times; this architecture is not supported")
    loss = causal_lm_loss(captured[0], head, labels, softcap=state.softcap, backend=state.backend, **loss_kwargs)
    fields = {name: value for name, value in output.items() if name not in ("loss", "logits")}
    result = type(output)(loss=loss, logits=output.logits if state.return_logits else None, **fields)
    return result if return_dict else result.to_tuple()


def patch(model: nn.Module, *, return_logits: bool = False, backend: str = "auto") -> nn.Module:
    """Make ``model`` (a transformers causal LM instance) compute its training loss with the fused op.

    ``return_logits``: also return the logits when labels are given (their memory comes back; for evaluation
    loops that need them). ``backend``: passed to ``linear_cross_entropy``. Returns ``model``. Patching twice
    raises; :func:`unpatch` undoes it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_OP}: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(return_logits, bool):
        raise TypeError(f"{_OP}: return_logits must be a bool, got {return_logits!r}")
    if backend not in BACKENDS:
        raise ValueError(f"{_OP}: backend must be one of {BACKENDS}, got {backend!r}")
    if getattr(model, _STATE, None) is not None:
        raise ValueError(f"{_OP}: {type(model).__name__} is already patched; call unpatch(model) first")
    config = _text_config(model)
    _lm_head(model)
    _check_supported(model, config)
    softcap = getattr(config, "final_logit_softcapping", None)
    original = model.forward
    state = _PatchState(original_forward=original, had_instance_forward="forward" in model.__dict__,
                        signature=inspect.signature(original), softcap=None if softcap is None else float(softcap),
                        return_logits=return_logits, backend=backend)
    # functools.wraps keeps the original signature visible (the Trainer inspects it for **kwargs, generate for
    # its arguments)
    forward = functools.wraps(original)(functools.partial(_fused_forward, model, state))
    object.__setattr__(model, _STATE, state)
    object.__setattr__(model, "forward", forward)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the forward that :func:`patch` replaced. Returns ``model``."""
    state = getattr(model, _STATE, None)
    if state is None:
        raise ValueError(f"karma_kernels.integrations.transformers.unpatch: {type(model).__name__} is not patched")
    if state.had_instance_forward:
        object.__setattr__(model, "forward", state.original_forward)
    else:
        del model.__dict__["forward"]
    del model.__dict__[_STATE]
    return model


def is_patched(model: nn.Module) -> bool:
    return getattr(model, _STATE, None) is not None


@contextlib.contextmanager
def patched(model: nn.Module, **options) -> Iterator[nn.Module]:
    """``with patched(model): ...`` -- :func:`patch` on entry, :func:`unpatch` on exit."""
    patch(model, **options)
    try:
        yield model
    finally:
        unpatch(model)
