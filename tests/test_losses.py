import math

import torch

from mextract.train import kd_loss


def test_kd_loss_matches_hand_computation():
    # one example, two classes; teacher logits (2, 0), student logits (0, 0), T = 2
    teacher_probs = torch.softmax(torch.tensor([[2.0, 0.0]]), 1)
    student = torch.tensor([[0.0, 0.0]])
    # teacher at T=2: softmax(1, 0) = (e/(e+1), 1/(e+1)); student at T=2: (1/2, 1/2)
    t1 = math.e / (math.e + 1)
    t2 = 1 / (math.e + 1)
    expected = (t1 * math.log(t1 / 0.5) + t2 * math.log(t2 / 0.5)) * 2**2
    assert math.isclose(kd_loss(student, teacher_probs, 2.0).item(), expected, rel_tol=1e-5)


def test_kd_loss_is_zero_when_student_matches():
    logits = torch.randn(8, 10)
    assert kd_loss(logits, torch.softmax(logits, 1), 3.0).abs().item() < 1e-5
