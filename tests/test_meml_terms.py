"""The MEML loss terms on the tiny model: values by hand, and the IML gradient direction."""

import pytest
import torch
from accelerate import Accelerator

from meml.algo.objective import LossSettings, TrainItem
from meml.train.update import accumulate_gradients

STRONG_PROMPT = [1, 40, 41, 42, 43]
WEAK_PROMPT = [1, 50, 51, 52]
ANSWER = [60, 61, 62, 63, 2]  # O+, ending with the end-of-turn token


@pytest.fixture
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def seq_logprob(model, prompt, response):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1]
        return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None]).sum().item()


def run(model, items):
    model.zero_grad(set_to_none=True)
    return accumulate_gradients(model, items, LossSettings(), 10_000, 2, Accelerator(cpu=True))


def iml_item(coef=1.0, teacher=None):
    return TrainItem("iml", WEAK_PROMPT, ANSWER, weight=1.0 / len(ANSWER), coef=coef, teacher_prompt_ids=teacher)


def test_iml_value_is_mean_token_nll_of_the_answer_under_the_weak_prompt(model):
    stats = run(model, [iml_item()])
    expected = -seq_logprob(model, WEAK_PROMPT, ANSWER) / len(ANSWER)
    assert stats["iml_loss"] == pytest.approx(expected, rel=1e-5)
    assert stats["loss"] == pytest.approx(expected, rel=1e-5)


def test_iml_step_raises_logp_of_the_answer_under_the_weak_prompt(model):
    before = seq_logprob(model, WEAK_PROMPT, ANSWER)
    run(model, [iml_item()])
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
    assert seq_logprob(model, WEAK_PROMPT, ANSWER) > before


def test_iml_kl_form_value_and_direction(model):
    def kl_value():
        with torch.no_grad():
            t = model(torch.tensor([STRONG_PROMPT + ANSWER])).logits[0, len(STRONG_PROMPT) - 1 : -1]
            s = model(torch.tensor([WEAK_PROMPT + ANSWER])).logits[0, len(WEAK_PROMPT) - 1 : -1]
            t, s = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
            return (t.exp() * (t - s)).sum(-1).mean().item()

    before = kl_value()
    stats = run(model, [iml_item(teacher=STRONG_PROMPT)])
    assert stats["iml_loss"] == pytest.approx(before, rel=1e-4)
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
    assert kl_value() < before


def test_total_loss_is_pg_plus_weighted_iml_plus_weighted_sft(model):
    pg = TrainItem("pg", STRONG_PROMPT, ANSWER, weight=1.0 / len(ANSWER), advantage=0.75)
    sft = TrainItem("hsft", WEAK_PROMPT, [70, 71, 2], weight=1.0 / 3, coef=0.5)
    iml = iml_item(coef=2.0)
    total = run(model, [pg, iml, sft])
    lp_pg = seq_logprob(model, STRONG_PROMPT, ANSWER)
    lp_iml = seq_logprob(model, WEAK_PROMPT, ANSWER)
    lp_sft = seq_logprob(model, WEAK_PROMPT, [70, 71, 2])
    l_pg = -0.75 * lp_pg / len(ANSWER)
    l_iml = -lp_iml / len(ANSWER)
    l_sft = -lp_sft / 3
    assert total["pg_loss"] == pytest.approx(l_pg, rel=1e-5)
    assert total["iml_loss"] == pytest.approx(l_iml, rel=1e-5)
    assert total["hsft_loss"] == pytest.approx(l_sft, rel=1e-5)
    assert total["loss"] == pytest.approx(l_pg + 2.0 * l_iml + 0.5 * l_sft, rel=1e-5)
    grads_total = {n: p.grad.clone() for n, p in model.named_parameters()}
    # gradient of the sum = sum of the gradients of the terms taken separately
    summed = None
    for item in (pg, iml, sft):
        run(model, [item])
        g = {n: p.grad.clone() for n, p in model.named_parameters()}
        summed = g if summed is None else {n: summed[n] + g[n] for n in g}
    # fp32 sums in another order: an element that nearly cancels keeps only an absolute
    # agreement, so the tolerance is relative to the tensor's largest gradient
    for n in grads_total:
        atol = 1e-4 * float(summed[n].abs().max())
        torch.testing.assert_close(grads_total[n], summed[n], rtol=1e-4, atol=atol)
