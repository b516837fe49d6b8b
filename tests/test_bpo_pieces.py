"""BPO's pieces (r4b_core/training/{logprobs,rollouts,advantages,bpo_loss,rewards,bpo_step}.py).

- the training forward's response log-probs equal the sampler's (fp32, <= 1e-5), images included;
- group advantages and token weights against hand-computed numbers;
- the clipped objective's gradient against a direct, token-by-token implementation of its formula;
- gradient accumulation over micro-batches gives the full batch's update; LoRA adapters switched off give
  the base model; the rule-based rewards and the format check on hand-written answers.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from r4b_core.models.r4b import R4BForConditionalGeneration
from r4b_core.processing.processor import R4BProcessor
from r4b_core.training.advantages import group_advantages, token_weights
from r4b_core.training.bpo_loss import ClipSettings, policy_loss
from r4b_core.training.bpo_step import BPOConfig, adapters_off, bpo_step
from r4b_core.training.logprobs import response_logprobs
from r4b_core.training.lora import apply_lora
from r4b_core.training.rewards import Completion, RewardSet, correct_answer, default_rewards, format_ok
from r4b_core.training.rollouts import RolloutPrompt, generate_rollouts, stack_images, to_model
from shapes_data import shape_conversation, shape_example  # scripts/shapes_data.py (conftest puts it on the path)


def prompts(n: int, offset: int = 0) -> list[RolloutPrompt]:
    return [RolloutPrompt(shape_conversation(), [shape_example(offset + i)[0]], gold="a red circle")
            for i in range(n)]


@pytest.fixture(scope="module")
def processor(tiny_checkpoint) -> R4BProcessor:
    return R4BProcessor.from_pretrained(tiny_checkpoint)


# ---------------------------------------------------------------------------------------------
# log-probs


def test_training_logprobs_equal_the_samplers(tiny_model, processor):
    batch = generate_rollouts(tiny_model, processor, prompts(2), group_size=2, temperature=1.0, max_new_tokens=8,
                              seed=3, record_sampler_logprobs=True)
    sampled = batch.sampled_mask.bool()
    assert len(batch) == 8 and batch.modes == ["long", "long", "short", "short"] * 2
    assert int(sampled.sum()) >= 8 and batch.response_ids.shape[1] > 8  # the short prefix is 4 tokens
    assert batch.sampler_logprobs[sampled].max() < 0
    diff = (batch.sampler_logprobs - batch.old_logprobs)[sampled].abs().max().item()
    assert diff <= 1e-5, diff
    # the prefix (forced) tokens are in the response and trained, but were not sampled
    assert bool((batch.loss_mask.bool() & ~sampled).any())
    # images matter: the same responses after another picture get other log-probs
    other = stack_images([processor(messages=shape_conversation(), images=[shape_example(50 + i // 4)[0]])
                          for i in range(len(batch))])
    with torch.no_grad():
        moved = response_logprobs(tiny_model, batch.prompt_ids, batch.prompt_mask, batch.response_ids,
                                  batch.response_mask, images=to_model(other, tiny_model))
    assert (moved - batch.old_logprobs)[sampled].abs().max() > 1e-3


def test_a_row_gets_the_same_logprobs_alone_as_in_a_padded_batch(tiny_model, processor):
    batch = generate_rollouts(tiny_model, processor, prompts(2), group_size=1, max_new_tokens=6, seed=1)
    for i in range(len(batch)):
        row = batch.rows(i, i + 1)
        keep = int(row.prompt_mask.sum())
        width = int(row.response_mask.sum())
        with torch.no_grad():
            alone = response_logprobs(tiny_model, row.prompt_ids[:, -keep:], row.prompt_mask[:, -keep:],
                                      row.response_ids[:, :width], row.response_mask[:, :width],
                                      images=to_model(row.images, tiny_model))
        assert (alone - batch.old_logprobs[i:i + 1, :width]).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------------
# advantages and weights, by hand


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    # group 0: mean 0.5, sample std sqrt(4 * 0.25 / 3) = 0.57735; group 2: mean 0.25, std sqrt(0.75 / 3) = 0.5
    expected = torch.tensor([[0.866025, -0.866025, -0.866025, 0.866025], [0.0, 0.0, 0.0, 0.0],
                             [1.5, -0.5, -0.5, -0.5]])
    assert torch.allclose(group_advantages(rewards, "std"), expected, atol=1e-5)
    assert torch.allclose(group_advantages(rewards, "none"),
                          torch.tensor([[0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0.0], [0.75, -0.25, -0.25, -0.25]]))
    with pytest.raises(ValueError, match="scale"):
        group_advantages(rewards, "rank")


def test_token_weights_by_hand():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert torch.allclose(token_weights(mask, "sequence"), torch.tensor([[0.25, 0.25, 0], [0.5, 0, 0]]))
    assert torch.allclose(token_weights(mask, "token"), torch.tensor([[1 / 3, 1 / 3, 0], [1 / 3, 0, 0]]))
    assert torch.allclose(token_weights(mask, "constant", 4), torch.tensor([[0.125, 0.125, 0], [0.125, 0, 0]]))


# ---------------------------------------------------------------------------------------------
# the objective's gradient against its formula


def direct_loss(logits, tokens, old, ref, mask, adv, eps_low, eps_high, beta):
    """The objective written out token by token: (1/N) sum_i (1/|o_i|) sum_t [-min(r A, clip(r) A) + beta k3]."""
    n = logits.shape[0]
    total = 0.0
    for i in range(n):
        length = int(mask[i].sum())
        for t in range(logits.shape[1]):
            if not mask[i, t]:
                continue
            logp = logits[i, t].log_softmax(-1)[tokens[i, t]]
            ratio = torch.exp(logp - old[i, t])
            low, high = torch.tensor(1 - eps_low, dtype=ratio.dtype), torch.tensor(1 + eps_high, dtype=ratio.dtype)
            clipped = torch.where(ratio < low, low, torch.where(ratio > high, high, ratio))
            surrogate = torch.minimum(ratio * adv[i], clipped * adv[i])
            d = ref[i, t] - logp
            total = total + (-surrogate + beta * (torch.exp(d) - d - 1)) / (n * length)
    return total


def test_objective_gradient_matches_the_formula():
    gen = torch.Generator().manual_seed(0)
    n, r, v = 4, 5, 7
    logits = torch.randn(n, r, v, generator=gen, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, v, (n, r), generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
    with torch.no_grad():
        now = logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    old = now + 0.4 * torch.randn(n, r, generator=gen, dtype=torch.float64)  # ratios well outside [0.8, 1.2]
    ref = now + 0.3 * torch.randn(n, r, generator=gen, dtype=torch.float64)
    adv = torch.tensor([1.2, -0.7, 0.4, -1.5], dtype=torch.float64)
    settings = ClipSettings(eps_low=0.2, eps_high=0.28, beta=0.05)

    logp = logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    loss, stats = policy_loss(logp, old, adv, token_weights(mask.double(), "sequence"), settings, ref_logp=ref)
    (grad,) = torch.autograd.grad(loss, logits)
    expected = direct_loss(logits, tokens, old, ref, mask, adv, 0.2, 0.28, 0.05)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    assert abs(loss.item() - expected.item()) < 1e-12
    assert torch.allclose(grad, expected_grad, atol=1e-12)
    assert grad.abs().sum() > 0
    assert 0 < stats["clip_fraction"] < 1  # some tokens clipped, some not: both branches were exercised
    assert stats["kl"] > 0


# ---------------------------------------------------------------------------------------------
# bpo_step: accumulation; LoRA reference; rewards


def test_micro_batches_give_the_full_batch_update(tiny_checkpoint, processor):
    after = []
    for micro in (8, 3):
        model = R4BForConditionalGeneration.from_pretrained(tiny_checkpoint)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        # an always-varying reward so the advantages are not all 0: the response length
        rewards = RewardSet([("length", lambda c: float(len(c.text)), 1.0)])
        metrics = bpo_step(model, opt, processor, prompts(2), rewards=rewards, seed=5,
                           config=BPOConfig(group_size=2, max_new_tokens=5, micro_batch_size=micro, max_grad_norm=1e9))
        assert metrics["grad_norm"] > 0
        after.append(model.language_model.lm_head.weight.detach().clone())
    base = R4BForConditionalGeneration.from_pretrained(tiny_checkpoint).language_model.lm_head.weight
    assert (after[0] - base).abs().max() > 1e-6  # it moved
    assert torch.allclose(after[0], after[1], atol=1e-6)


def test_adapters_off_is_the_base_model(tiny_checkpoint, processor):
    model = R4BForConditionalGeneration.from_pretrained(tiny_checkpoint)
    base = copy.deepcopy(model)
    apply_lora(model, rank=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.5)
    inputs = processor(messages=shape_conversation(), images=[shape_example(0)[0]])
    with torch.no_grad():
        adapted, reference = model(**inputs).logits, base(**inputs).logits
        with adapters_off(model):
            off = model(**inputs).logits
        again = model(**inputs).logits
    assert (adapted - reference).abs().max() > 1e-3
    assert torch.equal(off, reference)
    assert torch.equal(again, adapted)  # switched back on after the block


@pytest.mark.parametrize(("text", "mode", "reason", "gold", "kind", "correct", "formatted"), [
    ("<think>\n2 shapes. 2 x 3 = 6\n</think>\n\n6", "long", "eos", "6", "number", 1.0, 1.0),
    ("<think>\n2 shapes. 2 x 3 = 6\n</think>\n\n6.0", "long", "eos", "6", "number", 1.0, 1.0),
    ("<think>\n\n</think>\n\n9", "short", "eos", "6", "number", 0.0, 1.0),
    ("<think>\n\n</think>\n\nRed", "short", "eos", "red", "text", 1.0, 1.0),
    ("<think>\nthe shapes are red.\n</think>\n\nred", "short", "eos", "red", "text", 1.0, 0.0),  # thought in short
    ("<think>\n\n</think>\n\nred", "long", "eos", "red", "text", 1.0, 0.0),  # no thought in long
    ("<think>\nthe shapes are", "long", "length", "red", "text", 0.0, 0.0),  # cut off, thinking unfinished
    ("<think>\n\n</think>\n\n", "short", "eos", "red", "text", 0.0, 0.0),  # no answer
    ("red", "auto", "eos", "red", "text", 1.0, 0.0),  # no template
])
def test_rewards_on_hand_written_answers(text, mode, reason, gold, kind, correct, formatted):
    c = Completion(text, mode, reason, gold, kind)
    assert correct_answer(c) == correct
    assert format_ok(c) == formatted
    total, parts = default_rewards(0.1).score([c])
    assert math.isclose(float(total[0]), correct + 0.1 * formatted, abs_tol=1e-6)
    assert set(parts) == {"correct", "format"}
