"""The D2F distillation loss on hand-checkable cases, and the teacher/student attention asymmetry."""
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from d2f import masks
from d2f.losses import d2f_distill_loss, padding_blocks
from d2f.models import load_model


def _soft_ce(student_row, teacher_row):
    """-sum_v p_teacher(v) log p_student(v), written out with math on python floats."""
    zs = math.log(sum(math.exp(x) for x in student_row))
    zt = sum(math.exp(x) for x in teacher_row)
    return -sum(math.exp(t) / zt * (s - zs) for s, t in zip(student_row, teacher_row))


def test_loss_matches_hand_computation_two_blocks():
    # one sample: prompt of 1 token, then 2 answer blocks of 2 tokens; vocab 3
    s = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 0.0, -1.0], [0.5, 0.2, 0.1],
                       [2.0, 1.0, 0.0], [0.0, 3.0, 0.0]]])
    t = torch.tensor([[[9.0, 9.0, 9.0], [0.0, 1.0, 0.0], [2.0, 0.0, 0.0],
                       [0.0, 0.0, 0.0], [1.0, 2.0, 3.0]]])
    masked = torch.tensor([[False, True, False, True, True]])  # block 0: token 1; block 1: tokens 3, 4
    ratio = torch.tensor([[0.0, 0.25, 0.25, 0.5, 0.5]])
    out = d2f_distill_loss(s, t, masked, ratio, logits_shift=0)
    ce = [_soft_ce(s[0, i].tolist(), t[0, i].tolist()) for i in (1, 3, 4)]
    want = (ce[0] / 0.25 + ce[1] / 0.5 + ce[2] / 0.5) / 3
    assert out["loss"].item() == pytest.approx(want, rel=1e-6)
    assert out["ce"].item() == pytest.approx(sum(ce) / 3, rel=1e-6)
    assert out["masked_tokens"].item() == 3
    ent = [_soft_ce(t[0, i].tolist(), t[0, i].tolist()) for i in (1, 3, 4)]
    assert out["teacher_entropy"].item() == pytest.approx(sum(ent) / 3, rel=1e-6)
    assert out["kl"].item() == pytest.approx((sum(ce) - sum(ent)) / 3, rel=1e-5)
    # argmax agreement: token 1 (0 vs 1) no, token 3 (0 vs 0, tie -> index 0) yes, token 4 (1 vs 2) no
    assert out["agreement"].item() == pytest.approx(1 / 3)
    assert out["loss"].requires_grad is False  # inputs had no grad
    # unmasked positions do not matter
    s2, t2 = s.clone(), t.clone()
    s2[0, 2] += 5
    t2[0, 0] -= 3
    assert d2f_distill_loss(s2, t2, masked, ratio)["loss"].item() == pytest.approx(want, rel=1e-6)


def test_data_targets_train_plain_masked_token_ce_and_still_measure_the_teacher():
    """targets=data (the ablation): CE of the clean token at masked positions, / ratio; kl and agreement
    are still against the teacher, so both recipes log the same gap."""
    torch.manual_seed(0)
    s, t = torch.randn(2, 6, 5), torch.randn(2, 6, 5)
    ids = torch.randint(0, 5, (2, 6))
    masked = torch.zeros(2, 6, dtype=torch.bool)
    masked[:, 2:5] = True
    ratio = torch.full((2, 6), 0.5)
    out = d2f_distill_loss(s, t, masked, ratio, data_targets=ids)
    logp = torch.log_softmax(s, -1)
    ce = torch.stack([-logp[b, i, ids[b, i]] for b in range(2) for i in range(2, 5)])
    assert out["loss"].item() == pytest.approx((ce / 0.5).mean().item(), rel=1e-6)
    assert out["ce"].item() == pytest.approx(ce.mean().item(), rel=1e-6)
    assert out["kl"].item() == pytest.approx(d2f_distill_loss(s, t, masked, ratio)["kl"].item(), rel=1e-6)
    # Dream: after the shift row i-1 scores token i, as for the teacher
    shifted = d2f_distill_loss(s, t, masked, ratio, logits_shift=1, data_targets=ids)["loss"]
    manual = d2f_distill_loss(s[:, :-1], t[:, :-1], masked[:, 1:], ratio[:, 1:], data_targets=ids[:, 1:])["loss"]
    assert shifted.item() == pytest.approx(manual.item(), rel=1e-6)


def test_dream_shift_applies_to_both():
    torch.manual_seed(0)
    s, t = torch.randn(2, 6, 5), torch.randn(2, 6, 5)
    masked = torch.zeros(2, 6, dtype=torch.bool)
    masked[:, 3:] = True
    ratio = torch.full((2, 6), 0.5)
    shifted = d2f_distill_loss(s, t, masked, ratio, logits_shift=1)["loss"]
    # with the shift, token i is scored on row i-1 of both
    manual = d2f_distill_loss(s[:, :-1], t[:, :-1], masked[:, 1:], ratio[:, 1:])["loss"]
    assert shifted.item() == pytest.approx(manual.item(), rel=1e-6)
    assert shifted.item() != pytest.approx(d2f_distill_loss(s, t, masked, ratio)["loss"].item(), rel=1e-3)


def test_gradient_is_student_minus_teacher_probs_over_ratio():
    s = torch.randn(1, 4, 7, requires_grad=True)
    t = torch.randn(1, 4, 7)
    masked = torch.tensor([[False, True, True, False]])
    ratio = torch.tensor([[0.0, 0.3, 0.6, 0.6]])
    d2f_distill_loss(s, t, masked, ratio)["loss"].backward()
    want = (s.detach().softmax(-1) - t.softmax(-1)) / ratio[..., None].clamp(min=1e-9) / 2
    want[~masked] = 0
    torch.testing.assert_close(s.grad, want)


def test_no_masked_tokens_gives_zero_with_graph_and_bad_shapes_error():
    s = torch.randn(1, 4, 7, requires_grad=True)
    out = d2f_distill_loss(s, torch.randn(1, 4, 7), torch.zeros(1, 4, dtype=torch.bool), torch.zeros(1, 4))
    assert out["loss"].item() == 0 and out["masked_tokens"].item() == 0
    out["loss"].backward()  # still differentiable
    with pytest.raises(ValueError, match="differ in shape"):
        d2f_distill_loss(s, torch.randn(1, 4, 8), torch.ones(1, 4, dtype=torch.bool), torch.ones(1, 4))


def test_padding_blocks_marks_all_eos_answer_blocks_only():
    EOS = 1
    ids = torch.tensor([[5, 6, 7, 1, 1, 1, 1, 1, 1, 1],   # prompt 2: blocks [2,5) [5,8) [8,10)
                        [1, 1, 1, 1, 1, 1, 1, 9, 1, 1]])  # prompt 2: block 1 holds a 9
    pad = padding_blocks(ids, torch.tensor([2, 2]), 3, EOS)
    assert pad[0].tolist() == [False] * 5 + [True] * 5  # block 0 holds 7 -> kept
    assert pad[1].tolist() == [False, False, True, True, True, False, False, False, True, True]  # prompt EOS ignored


@pytest.mark.parametrize("preset", ["tiny-llada", "tiny-dream"])
def test_teacher_sees_full_attention_student_block_causal(preset):
    """Changing a token in a later block changes the teacher's logits at an earlier block but not
    the student's -- exactly what the recipe's two forwards compute."""
    torch.manual_seed(0)
    base = load_model(preset)
    for p in base.parameters():  # a non-degenerate model so attention visibly matters
        p.data.normal_(0, 0.3)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.3)  # a trained-looking adapter (B is zero at init)
    peft_model.eval()
    P, bs = 3, 4
    ids = torch.randint(2, 100, (1, P + 3 * bs))
    ids2 = ids.clone()
    ids2[0, P + 2 * bs + 1] = (ids[0, P + 2 * bs + 1] + 1) % 100 + 2  # a token of answer block 2
    pl = torch.tensor([P])
    with torch.no_grad():
        with peft_model.disable_adapter():
            t1, t2 = peft_model(ids), peft_model(ids2)
        s1 = peft_model(ids, mask=masks.block_causal(pl, bs))
        s2 = peft_model(ids2, mask=masks.block_causal(pl, bs))
    early = slice(P, P + 2 * bs)  # answer blocks 0 and 1
    assert (t1[0, early] - t2[0, early]).abs().max() > 1e-3  # the teacher looks ahead
    torch.testing.assert_close(s1[0, :P + 2 * bs], s2[0, :P + 2 * bs], rtol=0, atol=0)  # the student can't
    # and the student is the adapter model: it differs from the frozen base under the same mask
    with torch.no_grad(), peft_model.disable_adapter():
        b1 = peft_model(ids, mask=masks.block_causal(pl, bs))
    assert (b1 - s1).abs().max() > 1e-3
