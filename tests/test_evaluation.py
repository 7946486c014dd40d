"""Evaluation library: held-out losses, coherence fine-tune (keeps the best weights), retraining attack.

The attack is checked against an independent re-run of one seed with a hand-written AdamW loop, on a tiny HF
GPT-Neo; the model must come back unchanged.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from era_models import SEQ, VOCAB, gpt_neo
from torch import Tensor, nn

from lightning_gradroute.evaluation import (
    coherence_finetune,
    mean_loss,
    retain_forget_loss,
    retraining_attack,
    steps_to_recover,
)


def lm_loss(model: nn.Module, batch: Tensor) -> Tensor:
    return model(input_ids=batch, labels=batch).loss


def regression_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.mse_loss(model(batch[0]), batch[1])


def regression_data(n: int, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=gen)
    return x, x @ torch.tensor([[1.0], [-2.0], [0.5]])


def state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mean_loss_is_the_mean_of_batch_means_in_eval_mode() -> None:
    model = nn.Sequential(nn.Linear(3, 1), nn.Dropout(0.5))
    batches = [regression_data(4, 0), regression_data(2, 1)]
    expected = sum(float(F.mse_loss(model[0](x), y)) for x, y in batches) / 2  # dropout off in eval
    assert mean_loss(model, batches, regression_loss) == pytest.approx(expected, rel=1e-6)
    assert model.training  # mode restored
    both = retain_forget_loss(model, regression_loss, batches[:1], batches[1:])
    assert both == {"retain": mean_loss(model, batches[:1], regression_loss),
                    "forget": mean_loss(model, batches[1:], regression_loss)}
    with pytest.raises(ValueError, match="no batches"):
        mean_loss(model, [], regression_loss)
    with pytest.raises(ValueError, match="scalar tensor"):
        mean_loss(model, batches, lambda m, b: F.mse_loss(m(b[0]), b[1], reduction="none"))


def test_coherence_finetune_keeps_the_best_weights() -> None:
    torch.manual_seed(0)
    model, train, val = nn.Linear(3, 1), regression_data(16, 0), [regression_data(16, 1)]
    initial = state(model)

    def evaluate(m: nn.Module) -> float:
        return mean_loss(m, val, regression_loss)

    result = coherence_finetune(model, regression_loss, train, evaluate, steps=5, lr=0.05)
    assert len(result.curve) == 6 and result.curve[0] == evaluate(_restored(initial))
    assert result.best_step > 0 and result.best_loss == min(result.curve) < result.curve[0]
    assert evaluate(model) == result.best_loss  # the kept weights are the best step's

    # Training that only hurts (ascending the loss) keeps the weights from before fine-tuning, bit for bit.
    model.load_state_dict(initial)
    result = coherence_finetune(model, lambda m, b: -regression_loss(m, b), train, evaluate, steps=3, lr=0.05)
    assert result.best_step == 0 and all(loss > result.curve[0] for loss in result.curve[1:])
    assert_same_state(state(model), initial)


def _restored(weights: dict[str, Tensor]) -> nn.Module:
    model = nn.Linear(3, 1)
    model.load_state_dict(weights)
    return model


def test_retraining_attack_matches_an_independent_run_and_restores_the_model() -> None:
    torch.manual_seed(0)
    model = gpt_neo()
    initial = state(model)
    gen = torch.Generator().manual_seed(3)
    forget_pool = torch.randint(0, VOCAB, (8, SEQ), generator=gen)
    forget_val = [torch.randint(0, VOCAB, (8, SEQ), generator=gen)]
    retain_val = [torch.randint(0, VOCAB, (8, SEQ), generator=gen)]

    def evaluate(m: nn.Module) -> dict[str, float]:
        return retain_forget_loss(m, lm_loss, retain_val, forget_val)

    def sample(seed: int) -> Tensor:  # a different pair of forget examples per seed
        return forget_pool[torch.randperm(8, generator=torch.Generator().manual_seed(seed))[:2]]

    steps = 4
    result = retraining_attack(model, lm_loss, sample, evaluate, steps=steps, lr=1e-2, seeds=[0, 1])
    assert_same_state(state(model), initial)
    assert set(result.curves) == {"retain", "forget"} and all(len(c) == steps + 1 for c in result.curves.values())
    assert result.seed_curves[0]["forget"] != result.seed_curves[1]["forget"]
    for key, curve in result.curves.items():
        for i, value in enumerate(curve):
            assert value == pytest.approx(sum(result.seed_curves[s][key][i] for s in (0, 1)) / 2, rel=1e-12)
    assert result.lowest_loss == min(result.curves["forget"]) < result.curves["forget"][0]  # the attack relearns
    assert result.curves["forget"][result.lowest_step] == result.lowest_loss

    # Independent re-run of seed 1: a hand-written loop with its own AdamW.
    reference = gpt_neo()
    reference.load_state_dict(initial)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01)
    torch.manual_seed(1)
    batch, forget_curve = sample(1), [evaluate(reference)["forget"]]
    for _ in range(steps):
        reference.train()
        optimizer.zero_grad()
        lm_loss(reference, batch).backward()
        optimizer.step()
        reference.eval()
        with torch.no_grad():
            forget_curve.append(evaluate(reference)["forget"])
    assert result.seed_curves[1]["forget"] == forget_curve


def test_steps_to_recover() -> None:
    curve = [3.0, 2.5, 2.0, 2.2, 1.5]
    assert steps_to_recover(curve, 2.0) == 2
    assert steps_to_recover(curve, 3.0) == 0
    assert steps_to_recover(curve, 1.0) is None
    model, data = nn.Linear(3, 1), regression_data(8, 0)
    result = retraining_attack(model, regression_loss, data, lambda m: mean_loss(m, [data], regression_loss),
                               steps=4, lr=0.1, seeds=[0], target_loss=0.0)
    assert result.steps_to_recover is None and result.target_loss == 0.0
    reachable = result.curves["forget"][3]
    again = retraining_attack(model, regression_loss, data, lambda m: mean_loss(m, [data], regression_loss),
                              steps=4, lr=0.1, seeds=[0], target_loss=reachable)
    assert again.steps_to_recover == steps_to_recover(again.curves["forget"], reachable) <= 3
    # Evaluating every 2nd step (and the last) gives the same losses at those steps, and steps in step numbers.
    sparse = retraining_attack(model, regression_loss, data, lambda m: mean_loss(m, [data], regression_loss),
                               steps=5, lr=0.1, seeds=[0], eval_every=2)
    dense = retraining_attack(model, regression_loss, data, lambda m: mean_loss(m, [data], regression_loss),
                              steps=5, lr=0.1, seeds=[0])
    assert sparse.eval_steps == [0, 2, 4, 5] and dense.eval_steps == [0, 1, 2, 3, 4, 5]
    assert sparse.curves["forget"] == [dense.curves["forget"][s] for s in sparse.eval_steps]
    assert sparse.lowest_step in sparse.eval_steps
    assert steps_to_recover([3.0, 2.0, 1.0], 2.0, steps=[0, 4, 8]) == 4
    with pytest.raises(ValueError, match="2 steps for a curve of 3"):
        steps_to_recover([3.0, 2.0, 1.0], 2.0, steps=[0, 4])


def test_attack_and_finetune_reject_bad_arguments() -> None:
    model, data = nn.Linear(3, 1), regression_data(4, 0)
    with pytest.raises(ValueError, match="seeds must be distinct"):
        retraining_attack(model, regression_loss, data, lambda m: 0.0, steps=1, seeds=[1, 1])
    with pytest.raises(ValueError, match="steps must be a non-negative integer"):
        coherence_finetune(model, regression_loss, data, lambda m: 0.0, steps=-1)
    with pytest.raises(ValueError, match=r"mapping with 'forget'"):
        retraining_attack(model, regression_loss, data, lambda m: {"retain": 0.0}, steps=1, seeds=[0])
