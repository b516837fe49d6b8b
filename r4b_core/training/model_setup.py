"""Training helpers applied from outside the model (DESIGN.md decision 8; torchtitan's order).

    model = R4BForConditionalGeneration.from_pretrained(ckpt)
    freeze(model, vision=True)                      # requires_grad per part
    apply_activation_checkpointing(model)           # 1. AC: each ViT block and each decoder block
    compile_blocks(model)                           # 2. torch.compile per block (optional)
    apply_fsdp2(model, mesh)                        # 3. FSDP2: each ViT block, each decoder block, the root
    opt = torch.optim.AdamW(param_groups(model, weight_decay=0.1), lr=1e-4)
    ...
    labels = batch.pop("labels")                    # batch = training_data.collate(examples, pad_id)
    loss = causal_lm_loss_sum(model(**batch).logits, labels) / n_target_tokens_in_the_step

The model files hold no distributed, checkpointing or compile code: the units are the blocks of
``model.vision_tower.encoder.layers`` (``SiglipEncoderLayer``) and ``model.language_model.model.layers``
(``Qwen3DecoderLayer``), both ``nn.ModuleList``s.

Names. ``checkpoint_wrapper`` nests each wrapped block one level deeper
(``layers.0._checkpoint_wrapped_module.mlp...``) in ``named_parameters`` while ``state_dict()`` keeps
the plain names; ``canonical_name`` (r4b_core/models/hooks.py, shared with the hook names) strips the
wrapper parts (also ``_orig_mod.`` of a ``torch.compile`` wrapper; ``compile_blocks`` compiles in place
and adds none).

Activation-checkpointing memory, measured with ``python scripts/measure_ac_memory.py`` (2-core CPU,
fp32, torch 2.13; each configuration in a fresh process): one forward + backward of the ``small`` preset
(4 decoder blocks of width 1024, 4 ViT blocks of width 384, the real 151,936-token vocabulary; 400 M
parameters) on one 640x480 picture (5 views, 2929 image tokens) plus 40 text tokens:

    activations autograd keeps for backward    4.10 GB -> 2.04 GB  (-50 %)
      of which the blocks' own                  ~2.1 GB -> 0.07 GB (the block inputs the checkpoints keep)
      left untouched: log-softmax of the logits over the vocabulary (1.8 GB) and the rest outside blocks
    peak RSS during the step, above before it  8.21 GB -> 5.91 GB  (-28 %; includes the 1.6 GB of gradients
                                               and the 1.8 GB logits, which checkpointing does not change)

(activations: distinct tensors seen by ``torch.autograd.graph.saved_tensors_hooks``, parameters
excluded; RSS: ``/proc/self/status`` VmHWM after resetting it through ``/proc/self/clear_refs``.)
The loss is the same with and without; the price is one more forward of each block in backward.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from r4b_core.models.hooks import canonical_name
from r4b_core.training.data import IGNORE_INDEX

# parts of R4BForConditionalGeneration, by the first component of a parameter's name
PARTS = {
    "vision": ("vision_tower",),
    "projector": ("multi_modal_projector", "image_newline"),
    "text": ("language_model",),  # embeddings, decoder, final norm, lm_head
}


def vision_blocks(model: nn.Module) -> nn.ModuleList:
    """The ViT blocks (``SiglipEncoderLayer``, possibly wrapped)."""
    return model.vision_tower.encoder.layers


def text_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks (``Qwen3DecoderLayer``, possibly wrapped)."""
    return model.language_model.model.layers


# ---------------------------------------------------------------------------------------------
# what trains


def freeze(model: nn.Module, *, vision: bool | None = None, projector: bool | None = None,
           text: bool | None = None) -> nn.Module:
    """Set ``requires_grad`` per part: True freezes the part, False makes it trainable, None leaves it.

    Parts: ``vision`` = the vision tower; ``projector`` = the multimodal projector and
    ``image_newline``; ``text`` = embeddings, decoder blocks, final norm and ``lm_head``.
    ``freeze(model, vision=True)`` is the usual "frozen ViT" fine-tune.
    """
    flags = {"vision": vision, "projector": projector, "text": text}
    for name, param in model.named_parameters():
        top = canonical_name(name).split(".", 1)[0]
        part = next((p for p, tops in PARTS.items() if top in tops), None)
        if part is None:
            raise ValueError(f"freeze: parameter {name!r} belongs to no part ({', '.join(PARTS)}).")
        if flags[part] is not None:
            param.requires_grad_(not flags[part])
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a shared (tied) parameter counts once."""
    params = list(model.parameters())  # nn.Module.parameters() already de-duplicates shared tensors
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups of the trainable parameters: with weight decay (matrices: Linear and Conv
    weights, LoRA A/B) and without (norm weights and biases, biases, embeddings, ``image_newline``).

    A parameter reachable both as an embedding and as a matrix (a tied lm_head) gets no decay.
    Every trainable parameter lands in exactly one group (asserted).
    """
    no_decay: dict[int, nn.Parameter] = {}
    decay: dict[int, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            plain = canonical_name(f"{module_name}.{param_name}" if module_name else param_name)
            exempt = (
                isinstance(module, nn.Embedding) or param_name == "bias" or param.ndim < 2
                or "norm" in type(module).__name__.lower() or plain == "image_newline"
            )
            (no_decay if exempt else decay)[id(param)] = param
    for key in no_decay:  # an embedding shared with a Linear (tied lm_head): no decay wins
        decay.pop(key, None)
    trainable = {id(p): p for p in model.parameters() if p.requires_grad}
    grouped = list(decay) + list(no_decay)
    assert len(grouped) == len(set(grouped)) == len(trainable) and set(grouped) == set(trainable), (
        "param_groups: every trainable parameter must be in exactly one group")
    if not trainable:
        raise ValueError("param_groups: the model has no trainable parameters (everything is frozen).")
    return [
        {"params": list(decay.values()), "weight_decay": weight_decay},
        {"params": list(no_decay.values()), "weight_decay": 0.0},
    ]


# ---------------------------------------------------------------------------------------------
# loss


def causal_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Sum of next-token cross entropies over the counted tokens (logits at t predict labels at t+1), fp32.

    Only the counted positions are gathered before the fp32 upcast, so the full [B, T, V] logits are
    never copied. Divide by the number of target tokens in the whole optimizer step (all micro-batches,
    all ranks; ``count_target_tokens``) to get gradients that do not depend on how the step is split.
    """
    targets = labels[:, 1:].to(logits.device)
    keep = targets != ignore_index
    return F.cross_entropy(logits[:, :-1][keep].float(), targets[keep], reduction="sum")


def count_target_tokens(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> int:
    """Number of tokens ``causal_lm_loss_sum`` counts for these labels."""
    return int((labels[:, 1:] != ignore_index).sum())


# ---------------------------------------------------------------------------------------------
# activation checkpointing, compile, FSDP2 (in this order)


def _blocks(model: nn.Module, vision: bool, text: bool) -> Iterator[tuple[nn.ModuleList, int]]:
    for enabled, layers in ((vision, vision_blocks(model)), (text, text_blocks(model))):
        if enabled:
            yield from ((layers, i) for i in range(len(layers)))


def apply_activation_checkpointing(model: nn.Module, vision: bool = True, text: bool = True) -> int:
    """Recompute each ViT block's and each decoder block's activations in backward instead of keeping
    them (non-reentrant ``torch.utils.checkpoint`` through ``checkpoint_wrapper``, as torchtitan and
    torchtune do). Gradients are bit-identical to training without it. Returns the number of blocks
    wrapped; blocks already wrapped are left alone. Measured saving: see the module docstring."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper, checkpoint_wrapper

    wrapped = 0
    for layers, i in _blocks(model, vision, text):
        if isinstance(layers[i], CheckpointWrapper):
            continue
        layers[i] = checkpoint_wrapper(layers[i])  # non-reentrant; RNG state kept for dropout
        wrapped += 1
    return wrapped


def compile_blocks(model: nn.Module, vision: bool = True, text: bool = True, **compile_kwargs) -> int:
    """``torch.compile`` each ViT block and each decoder block in place (``nn.Module.compile``: parameter
    names do not change). ``compile_kwargs`` go to ``torch.compile`` (default ``fullgraph=True``: a graph
    break is an error). Apply after activation checkpointing and before FSDP2. Returns the block count."""
    compile_kwargs.setdefault("fullgraph", True)
    n = 0
    for layers, i in _blocks(model, vision, text):
        layers[i].compile(**compile_kwargs)
        n += 1
    return n


def _mixed_precision_policy(mixed_precision):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mixed_precision is None or isinstance(mixed_precision, MixedPrecisionPolicy):
        return mixed_precision or MixedPrecisionPolicy()
    if isinstance(mixed_precision, torch.dtype):  # compute in this dtype, reduce gradients in fp32
        return MixedPrecisionPolicy(param_dtype=mixed_precision, reduce_dtype=torch.float32)
    raise TypeError(f"mixed_precision should be None, a torch.dtype or a MixedPrecisionPolicy; "
                    f"got {mixed_precision!r}.")


def apply_fsdp2(model: nn.Module, mesh=None, mixed_precision=None, reshard_after_forward: bool = True) -> nn.Module:
    """Shard with FSDP2 (``torch.distributed.fsdp.fully_shard``): each ViT block, each decoder block, then
    the root (embeddings, lm_head, projector, image_newline, norms). ``mesh``: a 1-D DeviceMesh (None: all
    ranks on the default device type). ``mixed_precision``: None (fp32), a dtype (parameters in that dtype
    for compute, gradients reduced in fp32) or a ``MixedPrecisionPolicy``. Call after
    ``apply_activation_checkpointing`` and ``compile_blocks``; build the optimizer afterwards.

    FSDP gathers a block's parameters collectively, so every rank must run the same blocks each step:
    give every rank's micro-batch images (or none), never a mix.
    """
    from torch.distributed.fsdp import fully_shard

    kwargs = {"mesh": mesh, "mp_policy": _mixed_precision_policy(mixed_precision)}
    for layers in (vision_blocks(model), text_blocks(model)):
        for i, block in enumerate(layers):
            # the last decoder block runs backward right after forward: keeping it gathered saves an all-gather
            last = layers is text_blocks(model) and i == len(layers) - 1
            fully_shard(block, reshard_after_forward=reshard_after_forward and not last, **kwargs)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kwargs)
    return model
