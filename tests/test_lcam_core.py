import pytest
import torch
import torch.nn.functional as nnf

from lcam import (
    LCAM,
    AttentionMechanism,
    LCAMLoss,
    LossWeights,
    build_backbone,
    default_recipe,
    make_optimizer,
    make_scheduler,
    minmax_normalize,
)
from lcam.loss import area_term, total_variation


def test_area_term_by_hand():
    m = torch.tensor([[[[0.0, 1.0], [0.5, 0.25]]]])
    expected = sum((v + 0.0005) ** 0.3 for v in (0.0, 1.0, 0.5, 0.25)) / 4
    assert area_term(m).item() == pytest.approx(expected, rel=1e-6)


def test_total_variation_by_hand():
    # one 2x3 map, B = 1:  rows differ by (3,3,3); columns by (1,1),(1,1); border terms per SPEC
    m = torch.tensor([[[[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]]])
    dh = 3 * 3**2
    dw = 4 * 1**2
    first_row, last_row = 0 + 1 + 4, 9 + 16 + 25
    first_col, last_col = 0 + 9, 4 + 25
    expected = (dh + dw + 0.3 * (first_row + last_row + first_col + last_col)) / 2
    assert total_variation(m).item() == pytest.approx(expected, rel=1e-6)
    # B = 2 with the same map twice: the division by 2B keeps the value
    assert total_variation(torch.cat([m, m])).item() == pytest.approx(expected, rel=1e-6)


def test_loss_combines_terms_with_configurable_weights():
    torch.manual_seed(0)
    logits, targets, maps = torch.randn(4, 10), torch.tensor([1, 2, 3, 4]), torch.rand(4, 1, 5, 5)
    terms = LCAMLoss()(logits, targets, maps)
    ce = nnf.cross_entropy(logits, targets)
    assert terms.ce.item() == pytest.approx(ce.item(), rel=1e-6)
    assert terms.total.item() == pytest.approx(
        1.5 * ce.item() + 2.0 * terms.area.item() + 0.01 * terms.tv.item(), rel=1e-6
    )
    w = LossWeights(ce=1.0, area=0.0, tv=0.0)
    assert LCAMLoss(w)(logits, targets, maps).total.item() == pytest.approx(ce.item(), rel=1e-6)
    w2 = LossWeights(area_exponent=1.0, area_eps=0.0, tv_border=0.0)
    assert LCAMLoss(w2)(logits, targets, maps).area.item() == pytest.approx(maps.mean().item(), rel=1e-6)


def test_selected_rows_equal_full_maps_in_value_and_gradient():
    torch.manual_seed(0)
    am = AttentionMechanism(16, 10)
    feats = torch.randn(5, 16, 4, 4, requires_grad=True)
    targets = torch.tensor([3, 0, 9, 3, 7])

    full = am(feats)[torch.arange(5), targets].unsqueeze(1)
    sel = am.selected(feats, targets)
    assert torch.allclose(sel, full, atol=1e-6)

    def grads(maps):
        am.zero_grad()
        feats.grad = None
        (torch.sigmoid(maps) * torch.linspace(0, 1, 16).view(1, 1, 4, 4)).sum().backward()
        return am.conv.weight.grad.clone(), am.conv.bias.grad.clone(), feats.grad.clone()

    g_full = grads(am(feats)[torch.arange(5), targets].unsqueeze(1))
    g_sel = grads(am.selected(feats, targets))
    for a, b in zip(g_full, g_sel):
        assert torch.allclose(a, b, atol=1e-6)


def test_target_count_must_match_batch():
    am = AttentionMechanism(8, 10)
    feats = torch.randn(4, 8, 3, 3)
    with pytest.raises(ValueError, match="batch of 4"):
        am.selected(feats, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="out of range"):
        am.selected(feats, torch.tensor([1, 2, 3, 10]))


def test_constant_map_normalises_to_zeros():
    maps = torch.stack([torch.full((7, 7), 3.0), torch.arange(49.0).view(7, 7)])
    out = minmax_normalize(maps)
    assert not torch.isnan(out).any()
    assert torch.equal(out[0], torch.zeros(7, 7))
    assert out[1].min() == 0 and out[1].max() == 1


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LCAM(build_backbone("resnet18", weights="random"))


def test_explain_predicted_topk_given_and_all_classes(model):
    x = torch.rand(3, 3, 64, 64)
    e = model.explain(x, upsample=True, all_classes=True)
    logits = model.backbone(x)
    assert torch.equal(e.class_ids[:, 0], logits.argmax(1))
    assert e.raw.shape == (3, 1, 2, 2) and e.upsampled.shape == (3, 1, 64, 64)
    assert e.all_maps.shape == (3, 1000, 2, 2)
    assert torch.allclose(e.raw[:, 0], e.all_maps[torch.arange(3), e.class_ids[:, 0]], atol=1e-5)
    assert torch.allclose(e.probs[:, 0], logits.softmax(1).max(1).values, atol=1e-6)

    top = model.explain(x, top_k=3)
    assert torch.equal(top.class_ids, logits.topk(3, 1).indices)
    given = model.explain(x, targets=[5, 6, 7])
    assert given.class_ids.flatten().tolist() == [5, 6, 7]
    assert torch.allclose(
        given.raw[:, 0],
        model.attention(model.backbone.extract(x)[0])[torch.arange(3), torch.tensor([5, 6, 7])],
        atol=1e-5,
    )
    with pytest.raises(ValueError, match="batch of 3"):
        model.explain(x, targets=[1, 2])


def test_explain_from_cached_features_equals_from_images(model):
    x = torch.rand(2, 3, 64, 64)
    feats, _ = model.backbone.extract(x)
    a, b = model.explain(x, top_k=2), model.explain_features(feats, top_k=2)
    assert torch.equal(a.class_ids, b.class_ids)
    assert torch.allclose(a.maps, b.maps, atol=1e-6)


@pytest.mark.parametrize("method", ["fm", "img"])
def test_training_updates_attention_only(method):
    torch.manual_seed(0)
    model = LCAM(build_backbone("resnet18", weights="random"))
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    am_before = model.attention.conv.weight.detach().clone()
    recipe = default_recipe("resnet18").with_overrides(lr=0.1)
    opt = make_optimizer(model.attention, recipe)
    loss_fn = LCAMLoss()
    model.train()
    x = torch.rand(4, 3, 64, 64)
    targets = torch.tensor([1, 2, 3, 4])
    for _ in range(3):
        feats = None
        if method == "fm":
            with torch.no_grad():
                feats = model.backbone.features(model.backbone.normalize(x))
        logits, m = model.training_forward(method, targets, feats=feats, images=x)
        loss = loss_fn(logits, targets, m).total
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.backbone.state_dict()
    for k, v in before.items():  # weights and BatchNorm running statistics
        assert torch.equal(v, after[k]), k
    assert not torch.equal(am_before, model.attention.conv.weight)


def test_optimizer_bias_lr_and_step_schedule():
    am = AttentionMechanism(4, 3)
    recipe = default_recipe("resnet50")
    assert (recipe.lr, recipe.epochs, recipe.gamma, recipe.decay_epochs) == (1e-4, 26, 0.95, 12)
    opt = make_optimizer(am, recipe)
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 2e-4]
    assert all(g["nesterov"] and g["momentum"] == 0.9 and g["weight_decay"] == 5e-4 for g in opt.param_groups)
    sched = make_scheduler(opt, recipe, steps_per_epoch=2)
    lrs = []
    for _ in range(2 * 20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == lrs[1] == pytest.approx(1e-4)
    assert lrs[2] == pytest.approx(1e-4 * 0.95)
    assert lrs[2 * 15] == pytest.approx(1e-4 * 0.95**12)  # decays for the first 12 epochs only
    vgg = default_recipe("vgg16")
    assert (vgg.lr, vgg.epochs, vgg.gamma) == (1e-2, 8, 0.75)
    one = default_recipe("vgg16", "onecycle")
    opt = make_optimizer(am, one)
    sched = make_scheduler(opt, one, steps_per_epoch=10)
    peak = 0.0
    for _ in range(80):
        opt.step()
        sched.step() if sched.last_epoch < 79 else None
        peak = max(peak, opt.param_groups[0]["lr"])
    assert peak == pytest.approx(1e-3, rel=1e-2)


def test_upsample_is_one_convention_for_images_and_features(model):
    """``upsample`` means the same in explain and explain_features: True the input crop, an int that size."""
    from lcam.model import upsample_size

    assert (upsample_size(False, (224, 224)), upsample_size(True, (200, 100)), upsample_size(64, (224, 224))) == (
        None,
        (200, 100),
        (64, 64),
    )
    crop = model.backbone.preprocessing.crop
    x = torch.rand(2, 3, crop, crop)
    feats, _ = model.backbone.extract(x)
    a, b = model.explain(x, upsample=True), model.explain_features(feats, upsample=True)
    assert a.upsampled.shape[-2:] == b.upsampled.shape[-2:] == (crop, crop)
    torch.testing.assert_close(a.upsampled, b.upsampled, atol=1e-5, rtol=1e-5)
    assert model.explain_features(feats, upsample=32).upsampled.shape[-2:] == (32, 32)
