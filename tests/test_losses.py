import copy

import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from clip_ping.model.heads import NeighborGuidance
from clip_ping.model.losses import ClipPingLoss, info_nce


def _unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def test_info_nce_equals_open_clip_clip_loss():
    u, v = _unit(16, 32, seed=0), _unit(16, 32, seed=1)
    scale = torch.tensor(1 / 0.07)
    ours = info_nce(u, v, scale)
    theirs = ClipLoss()(u, v, scale)
    assert torch.allclose(ours, theirs, atol=1e-6)
    # the loss is symmetric in its two arguments
    assert torch.allclose(info_nce(v, u, scale), ours, atol=1e-6)


def test_each_neighbor_term_is_an_open_clip_loss_on_its_pair():
    u, v = _unit(8, 16, seed=2), _unit(8, 16, seed=3)
    t = {k: _unit(8, 16, seed=10 + i) for i, k in enumerate(["nn_image", "nn_text", "xnn_image", "xnn_text"])}
    scale = torch.tensor(20.0)
    out = ClipPingLoss(lambda_nn=0.3, lambda_xnn=0.7)(u, v, scale, t)
    ref = ClipLoss()
    nn_ref = (ref(u, t["nn_image"], scale) + ref(v, t["nn_text"], scale)) / 2
    xnn_ref = (ref(u, t["xnn_image"], scale) + ref(v, t["xnn_text"], scale)) / 2
    clip_ref = ref(u, v, scale)
    assert torch.allclose(out["loss_clip"], clip_ref, atol=1e-6)
    assert torch.allclose(out["loss_nn"], nn_ref, atol=1e-6)
    assert torch.allclose(out["loss_xnn"], xnn_ref, atol=1e-6)
    assert torch.allclose(out["loss"], clip_ref + 0.3 * nn_ref + 0.7 * xnn_ref, atol=1e-6)


def test_zero_lambdas_give_plain_clip_loss_and_gradients_exactly():
    torch.manual_seed(0)
    encoder = torch.nn.Linear(12, 8)
    x_img, x_txt = torch.randn(6, 12), torch.randn(6, 12)
    guidance = NeighborGuidance(5, 7, 8)
    teacher = [torch.randn(6, 5), torch.randn(6, 7), torch.randn(6, 5), torch.randn(6, 7)]

    def run(loss_fn, with_targets):
        enc = copy.deepcopy(encoder)
        scale = torch.tensor(14.0, requires_grad=True)
        u, v = F.normalize(enc(x_img), dim=-1), F.normalize(enc(x_txt), dim=-1)
        targets = guidance.targets(*teacher) if with_targets else None
        loss = loss_fn(u, v, scale, targets)["loss"]
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in enc.parameters()] + [scale.grad.clone()]

    loss_ping, grads_ping = run(ClipPingLoss(0.0, 0.0), with_targets=True)
    loss_clip, grads_clip = run(lambda u, v, s, t: {"loss": ClipLoss()(u, v, s)}, with_targets=False)
    assert torch.equal(loss_ping, loss_clip)
    for a, b in zip(grads_ping, grads_clip):
        assert torch.equal(a, b)


def test_guidance_terms_change_the_gradient_when_enabled():
    u = _unit(6, 8, seed=4).requires_grad_()
    v = _unit(6, 8, seed=5)
    t = {k: _unit(6, 8, seed=20 + i) for i, k in enumerate(["nn_image", "nn_text", "xnn_image", "xnn_text"])}
    scale = torch.tensor(10.0)
    g_clip = torch.autograd.grad(ClipPingLoss(0, 0)(u, v, scale, t)["loss"], u)[0]
    g_ping = torch.autograd.grad(ClipPingLoss(0.5, 0.5)(u, v, scale, t)["loss"], u)[0]
    assert not torch.allclose(g_clip, g_ping)


def test_missing_targets_are_refused():
    u, v = _unit(4, 8, seed=6), _unit(4, 8, seed=7)
    with pytest.raises(ValueError):
        ClipPingLoss(0.5, 0.5)(u, v, torch.tensor(10.0))


def test_guidance_targets_follow_the_method_table():
    g = NeighborGuidance(3, 4, 5)
    a_p, b_p, a_q, b_q = torch.randn(2, 3), torch.randn(2, 4), torch.randn(2, 3), torch.randn(2, 4)
    t = g.targets(a_p, b_p, a_q, b_q)
    assert torch.allclose(t["nn_image"], g.project_image(a_p))
    assert torch.allclose(t["xnn_image"], g.project_text(b_p))
    assert torch.allclose(t["nn_text"], g.project_text(b_q))
    assert torch.allclose(t["xnn_text"], g.project_image(a_q))
    for value in t.values():
        assert torch.allclose(value.norm(dim=-1), torch.ones(2), atol=1e-5)


def _direct_duplicate_loss(x, y, scale, groups, rule):
    """The two rules written out row by row, for a direct comparison."""
    import math

    total = 0.0
    for a, b in ((x, y), (y, x)):
        logits = (scale * a @ b.T).tolist()
        rows = []
        for i, row in enumerate(logits):
            same = [j for j in range(len(row)) if groups[j] == groups[i]]
            if rule == "mask":
                kept = [j for j in range(len(row)) if j == i or j not in same]
                rows.append(-(row[i] - math.log(sum(math.exp(row[j]) for j in kept))))
            else:
                log_z = math.log(sum(math.exp(v) for v in row))
                rows.append(-sum(row[j] - log_z for j in same) / len(same))
        total += sum(rows) / len(rows)
    return total / 2


@pytest.mark.parametrize("rule", ["mask", "positives"])
def test_duplicate_captions_rules_match_a_direct_computation(rule):
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(6, 5, dtype=torch.float64), dim=1)
    y = torch.nn.functional.normalize(torch.randn(6, 5, dtype=torch.float64), dim=1)
    groups = torch.tensor([0, 1, 0, 2, 1, 0])
    got = info_nce(x, y, torch.tensor(7.0, dtype=torch.float64), groups=groups, duplicates=rule)
    assert float(got) == pytest.approx(_direct_duplicate_loss(x, y, 7.0, groups.tolist(), rule), rel=1e-10)


def test_duplicate_rules_without_duplicates_or_with_none_are_plain_clip():
    torch.manual_seed(1)
    x, y = torch.randn(5, 4), torch.randn(5, 4)
    plain = info_nce(x, y, torch.tensor(3.0))
    assert torch.equal(info_nce(x, y, torch.tensor(3.0), groups=torch.tensor([0, 0, 1, 1, 2]), duplicates="none"), plain)
    for rule in ("mask", "positives"):
        distinct = info_nce(x, y, torch.tensor(3.0), groups=torch.arange(5), duplicates=rule)
        assert torch.allclose(distinct, plain)
