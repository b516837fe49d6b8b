"""The clipped policy objective of GRPO / BPO, with an optional KL penalty to a reference policy.

Per response token t of rollout i (logp = log pi_theta, old = log pi_old, the policy that sampled it):

    rho[i, t] = exp(logp[i, t] - old[i, t])
    l[i, t]   = -min(rho * A_i, clip(rho, 1 - eps_low, 1 + eps_high) * A_i)  +  beta * KL[i, t]
    KL[i, t]  = exp(ref - logp) - (ref - logp) - 1          (k3 estimator of KL(pi_theta || pi_ref), >= 0)
    loss      = sum_{i, t} w[i, t] * l[i, t]                 (w: advantages.token_weights)

``eps_high > eps_low`` is DAPO's "clip-higher" (arXiv 2503.14476); the default is PPO's symmetric 0.2.
``beta = 0`` (no reference) is DAPO's / Dr. GRPO's choice; GRPO used 0.04. With one optimizer update per
rollout batch, rho = 1 and the objective's gradient is the plain policy gradient sum w * A * grad logp;
clipping acts from the second update on the same rollouts.

Statistics (no gradient): the weighted mean KL, the fraction of trained tokens whose clipped branch is the
active one ("clip fraction"), and the weighted mean ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ClipSettings:
    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.0  # KL coefficient; 0: no reference forward at all

    def __post_init__(self) -> None:
        if not (0 <= self.eps_low < 1 and self.eps_high >= 0 and self.beta >= 0):
            raise ValueError(f"clip settings: need 0 <= eps_low < 1, eps_high >= 0, beta >= 0; got {self}.")


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): exp(d) - d - 1 with d = ref - logp (>= 0, unbiased)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, weights: torch.Tensor,
                settings: ClipSettings = ClipSettings(), ref_logp: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss (a scalar with gradient through ``logp``) and its statistics.

    ``logp``, ``old_logp``, ``weights`` and ``ref_logp``: [N, R]; ``advantages``: [N] (one per response,
    broadcast over its tokens). Tokens with weight 0 contribute nothing (their logp may be anything finite).
    """
    if not (logp.shape == old_logp.shape == weights.shape) or advantages.shape != logp.shape[:1]:
        raise ValueError(f"policy_loss: logp {list(logp.shape)}, old_logp {list(old_logp.shape)} and weights "
                         f"{list(weights.shape)} should be one [N, R] shape and advantages {list(advantages.shape)} "
                         "[N].")
    if settings.beta > 0 and ref_logp is None:
        raise ValueError("policy_loss: beta > 0 needs the reference log-probs (ref_logp).")
    adv = advantages[:, None].to(logp.dtype)  # [N, 1]
    ratio = torch.exp(logp - old_logp.detach())
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - settings.eps_low, 1 + settings.eps_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    kl = k3_kl(logp, ref_logp.detach()) if ref_logp is not None else torch.zeros_like(logp)
    if settings.beta > 0:
        per_token = per_token + settings.beta * kl
    loss = (weights * per_token).sum()
    with torch.no_grad():
        trained = weights > 0
        total = weights.sum().clamp(min=1e-12)
        stats = {
            "kl": float((weights * kl).sum() / total),
            "clip_fraction": float(((clipped < unclipped) & trained).sum() / trained.sum().clamp(min=1)),
            "ratio": float((weights * ratio).sum() / total),
        }
    return loss, stats
