"""Rows no sample trained (coverage 0) in the exported checkpoint: init / transfer / keep, and trained rows
pulled towards their start by --row-prior (lcam.uncovered)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from jobs.cli import main as cli_main
from lcam import minmax_normalize
from lcam.training import init_attention
from lcam.uncovered import cross_validate, fill_uncovered, pull_to_start
from pipeline.train.checkpoints import load_checkpoint, load_lcam
from pipeline.train.fm import train_fm
from pipeline.train.run_folder import trainer_state_from_checkpoint
from tests.test_heldout import LABELS, config, effnet, toy  # noqa: F401  (fixtures)

COVERED = sorted(set(LABELS))  # rows 3, 7, 9, 500


# ---------------------------------------------------------------- the rules on a run (pipeline)
def test_init_fill_restores_the_start_and_leaves_trained_rows_bit_exact(toy, effnet, tmp_path):
    # lr 3 with weight decay: untrained rows shrink every step (3,040 steps of the held-out recipe: ~1e-9)
    out = tmp_path / "init"
    train_fm(config(toy, out, target="label", init="cam", epochs=6, lr=3.0, schedule="onecycle"))
    ckpt = load_checkpoint(str(out / "checkpoint.pt"))
    start = init_attention(effnet, 0, "cam").state_dict()
    state = trainer_state_from_checkpoint(ckpt)["attention"]  # the raw trained state (what resume uses)
    w, w0, raw = (
        ckpt["attention"]["conv.weight"].flatten(1),
        start["conv.weight"].flatten(1),
        state["conv.weight"].flatten(1),
    )
    uncovered = [k for k in range(1000) if k not in COVERED]
    # the bug this fixes: the raw untrained rows decayed far below their start
    ratio = raw[uncovered].norm(dim=1) / w0[uncovered].norm(dim=1)
    assert (
        float(ratio.max()) < 0.99 and float(ratio.max() - ratio.min()) < 1e-5
    )  # one common decay factor for all of them
    assert torch.equal(w[uncovered], w0[uncovered]) and torch.equal(
        ckpt["attention"]["conv.bias"][uncovered], start["conv.bias"][uncovered]
    )
    assert torch.equal(w[COVERED], raw[COVERED]) and not torch.equal(
        w[COVERED], w0[COVERED]
    )  # trained rows untouched, and trained
    assert ckpt["extra"]["uncovered"]["rule"] == "init" and ckpt["extra"]["uncovered"]["rows"] == uncovered
    assert ckpt["config"]["uncovered"] == "init" and ckpt["coverage"][uncovered].eq(0).all()  # still marked untrained
    keep = tmp_path / "keep"
    train_fm(config(toy, keep, target="label", init="cam", epochs=6, lr=3.0, schedule="onecycle", uncovered="keep"))
    kept = load_checkpoint(str(keep / "checkpoint.pt"))
    assert kept["trained_rows"] is None and kept["extra"]["uncovered"]["rule"] == "keep"
    for k in state:  # keep: today's checkpoint, the trained state as it is (the same run: same trajectory)
        assert torch.equal(kept["attention"][k], state[k])
    # an uncovered --init cam row explains exactly as CAM (the classifier's weights on F)
    model, _ = load_lcam(str(out / "checkpoint.pt"))
    feats = toy["feats"][:3]
    fc_w, _ = effnet.linear_classifier()
    cam = torch.einsum("kc,bchw->bkhw", fc_w, feats)
    with torch.no_grad():
        z = model.attention(feats)
    torch.testing.assert_close(
        minmax_normalize(z[:, uncovered]), minmax_normalize(cam[:, uncovered]), atol=2e-5, rtol=0
    )


def test_resume_of_a_filled_run_equals_the_uninterrupted_run(toy, tmp_path, capsys):
    kw = dict(target="label", init="cam", epochs=3, lr=3.0, schedule="onecycle", uncovered="init")
    train_fm(config(toy, tmp_path / "full", **kw))
    assert train_fm(config(toy, tmp_path / "cut", max_steps=4, **kw)).stopped_early
    train_fm(config(toy, tmp_path / "cut", resume=True, epochs=3))
    a, b = (
        load_checkpoint(str(tmp_path / "full" / "checkpoint.pt")),
        load_checkpoint(str(tmp_path / "cut" / "checkpoint.pt")),
    )
    for k in a["attention"]:
        assert torch.equal(a["attention"][k], b["attention"][k])
        assert torch.equal(
            trainer_state_from_checkpoint(a)["attention"][k], trainer_state_from_checkpoint(b)["attention"][k]
        )
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    # the resumed trainer continued from the raw (decayed) rows, not the filled ones: the raw state
    # of the full run after 3 epochs differs from the fill on uncovered rows
    raw = trainer_state_from_checkpoint(a)["attention"]["conv.weight"].flatten(1)
    assert not torch.equal(raw[0], a["attention"]["conv.weight"].flatten(1)[0])


def test_finished_run_re_exported_with_another_rule_keeps_its_trained_state(toy, effnet, tmp_path, capsys):
    out = tmp_path / "run"
    train_fm(config(toy, out, target="label", init="cam", epochs=2, uncovered="keep"))
    before = load_checkpoint(str(out / "checkpoint.pt"))
    # `lcam train --resume --uncovered init`: no step, the checkpoint re-exported
    assert cli_main(["train", "--out", str(out), "--resume", "--uncovered", "init", "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == before["step"]
    after = load_checkpoint(str(out / "checkpoint.pt"))
    assert after["config"]["uncovered"] == "init" and after["step"] == before["step"]
    for k in before["attention"]:
        assert torch.equal(trainer_state_from_checkpoint(after)["attention"][k], before["attention"][k])
    start = init_attention(effnet, 0, "cam").conv.weight.flatten(1)
    assert torch.equal(after["attention"]["conv.weight"].flatten(1)[0], start[0])
    assert torch.equal(
        load_checkpoint(str(out / "epoch-002.pt"))["attention"]["conv.weight"], after["attention"]["conv.weight"]
    )


def test_init_from_fills_with_the_source_rows(toy, tmp_path):
    fm = tmp_path / "fm"
    train_fm(config(toy, fm, target="label", init="cam", epochs=2, lr=3.0, schedule="onecycle"))
    src = load_checkpoint(str(fm / "checkpoint.pt"))
    warm = tmp_path / "warm"
    # the warm run trains only classes 3 and 7 (a subset); rows 9 and 500 stay as the source trained them
    train_fm(
        config(toy, warm, target="label", init_from=str(fm / "checkpoint.pt"), epochs=2, lr=3.0, schedule="onecycle")
    )
    ckpt = load_checkpoint(str(warm / "checkpoint.pt"))
    cov = ckpt["coverage"]
    assert cov.tolist() == src["coverage"].tolist()
    uncovered = (cov == 0).nonzero().flatten()
    for k in ("conv.weight", "conv.bias"):
        assert torch.equal(
            ckpt["attention"][k][uncovered], src["attention"][k][uncovered]
        )  # the source's export (CAM rows)


def test_user_errors_for_the_rules(toy, tmp_path, capsys):
    cases = [
        (["--uncovered", "transfer", "--init", "random"], "--uncovered transfer maps CAM rows"),
        (["--uncovered", "transfer", "--init-from", str(tmp_path / "x.pt")], "--uncovered transfer maps CAM rows"),
        (["--uncovered", "init", "--transfer-ridge", "-1"], "--transfer-ridge must be auto or a number >= 0"),
        (
            ["--row-prior", "1", "--init", "random"],
            "--row-prior pulls trained rows towards where they started, here a random draw",
        ),
        (
            ["--row-prior", "1", "--recipe", "spec"],
            "--row-prior pulls trained rows",
        ),  # the SPEC recipe's default init is the random draw
        (["--row-prior", "-1", "--init", "cam"], "--row-prior"),
    ]
    for extra, needle in cases:
        out = tmp_path / "never"
        rc = cli_main(["train", "--cache", toy["cache"], "--out", str(out), "--epochs", "1", "--no-progress", *extra])
        err = capsys.readouterr().err
        assert rc == 2 and needle in err, (extra, err)
        assert not out.exists()


# ---------------------------------------------------------------- transfer (lcam.uncovered, pure)
def test_transfer_recovers_an_exact_linear_map_of_the_start_rows():
    """Trained rows = start rows x (a scaled rotation A): every covered row's change is the
    same linear map, so the fit must carry it to the uncovered rows exactly (direction) at
    their start norm, with their start bias."""
    g = torch.Generator().manual_seed(0)
    c, k = 16, 60
    w0 = torch.randn(k, c, generator=g)
    b0 = torch.randn(k, generator=g)
    q, _ = torch.linalg.qr(torch.randn(c, c, generator=g, dtype=torch.float64))
    a = 0.3 * q  # the trained norm differs from the start's (as decay and the lr make it)
    coverage = torch.zeros(k, dtype=torch.int64)
    coverage[:40] = 1
    trained_w = w0.clone()
    trained_w[:40] = (w0[:40].double() @ a).float()
    trained_b = torch.full((k,), -7.0)
    trained = {"conv.weight": trained_w.reshape(k, c, 1, 1), "conv.bias": trained_b}
    start = {"conv.weight": w0.reshape(k, c, 1, 1), "conv.bias": b0}
    r = fill_uncovered(trained, coverage, start, "transfer", ridge=1e-9)
    got = r.state["conv.weight"].flatten(1)
    want = (w0[40:].double() @ q).float()  # direction of w A, at |w|: w Q since Q is orthogonal
    torch.testing.assert_close(got[40:], want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[40:].norm(dim=1), w0[40:].norm(dim=1), atol=1e-4, rtol=1e-5)
    assert torch.equal(r.state["conv.bias"][40:], b0[40:]) and torch.equal(r.state["conv.bias"][:40], trained_b[:40])
    assert torch.equal(got[:40], trained_w[:40])  # covered rows: bit for bit
    assert r.rows == list(range(40, 60)) and r.record()["ridge"] == 1e-9
    # with no shared map (trained rows unrelated to their start) cross-validation prefers heavy ridge
    # (stay near the start); with the exact map it prefers the lightest one of the grid
    auto = fill_uncovered(trained, coverage, start, "transfer")
    assert auto.ridge == 0.01 and auto.cv["0.01"] > 0.99
    noise = {"conv.weight": torch.randn(k, c, 1, 1, generator=g), "conv.bias": trained_b}
    cv = cross_validate(w0[:40].double(), noise["conv.weight"].flatten(1)[:40].double())
    assert max(cv, key=cv.get) == 10.0 and cv[10.0] > cv[0.01]


def test_rules_on_a_hand_made_state_and_refusals():
    start = {"conv.weight": torch.ones(4, 3, 1, 1), "conv.bias": torch.ones(4)}
    trained = {"conv.weight": torch.arange(12.0).reshape(4, 3, 1, 1), "conv.bias": torch.arange(4.0)}
    cov = torch.tensor([2, 0, 1, 0])
    keep = fill_uncovered(trained, cov, start, "keep")
    assert all(torch.equal(keep.state[k], trained[k]) for k in trained) and keep.rows == [1, 3]
    init = fill_uncovered(trained, cov, start, "init")
    assert init.state["conv.weight"].flatten(1).tolist() == [[0, 1, 2], [1, 1, 1], [6, 7, 8], [1, 1, 1]]
    assert init.state["conv.bias"].tolist() == [0, 1, 2, 1]
    assert trained["conv.weight"].flatten(1)[1].tolist() == [3, 4, 5]  # the input is not modified
    one = fill_uncovered(
        trained, torch.tensor([1, 0, 0, 0]), start, "transfer"
    )  # nothing to fit: the start rows, said so
    assert one.rule == "init" and "at least 2" in one.record()["note"]
    assert one.state["conv.weight"].flatten(1).tolist() == [[0, 1, 2], [1, 1, 1], [1, 1, 1], [1, 1, 1]]
    with pytest.raises(ValueError, match="unknown rule"):
        fill_uncovered(trained, cov, start, "zero")
    assert np.isclose(fill_uncovered(trained, cov, start, "transfer", ridge=0.5).ridge, 0.5)


def test_transfer_export_of_a_run_is_the_rule_applied_to_its_trained_state(toy, effnet, tmp_path):
    out = tmp_path / "transfer"
    train_fm(config(toy, out, target="label", init="cam", uncovered="transfer", transfer_ridge="0.3"))
    ckpt = load_checkpoint(str(out / "checkpoint.pt"))
    raw = trainer_state_from_checkpoint(ckpt)["attention"]
    start = init_attention(effnet, 0, "cam").state_dict()
    want = fill_uncovered(raw, ckpt["coverage"].long(), start, "transfer", ridge=0.3)
    for k in raw:
        assert torch.equal(ckpt["attention"][k], want.state[k])
    rec = ckpt["extra"]["uncovered"]
    assert rec["rule"] == "transfer" and rec["ridge"] == 0.3 and len(rec["rows"]) == 1000 - len(COVERED)
    w, w0 = ckpt["attention"]["conv.weight"].flatten(1), start["conv.weight"].flatten(1)
    torch.testing.assert_close(
        w[rec["rows"]].norm(dim=1), w0[rec["rows"]].norm(dim=1), atol=1e-4, rtol=1e-5
    )  # CAM's norm
    assert not torch.equal(w[rec["rows"]], w0[rec["rows"]])  # and not CAM's direction
    assert torch.equal(w[COVERED], raw["conv.weight"].flatten(1)[COVERED])
    # a start checkpoint (no step, nothing trained): nothing to fit, the start rows, and the record says so
    train_fm(config(toy, tmp_path / "zero", target="label", init="cam", uncovered="transfer", max_steps=0))
    zero = load_checkpoint(str(tmp_path / "zero" / "checkpoint.pt"))
    assert zero["extra"]["uncovered"]["rule"] == "init" and "transfer asked" in zero["extra"]["uncovered"]["note"]
    assert torch.equal(zero["attention"]["conv.weight"], start["conv.weight"])


# ---------------------------------------------------------------- --row-prior
def test_pull_to_start_by_hand():
    """Start (1, 0), trained (0, 2): with prior 1 a row trained by n = 1 sample points half-way
    (s = 1/2) at norm (1 + 2)/2, one trained by n = 3 three quarters of the way (s = 3/4)."""
    w0 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    w = torch.tensor([[0.0, 2.0], [0.0, 2.0], [0.0, 2.0]])
    b0, b = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([-3.0, -3.0, -3.0])
    moved = pull_to_start(w, b, w0, b0, torch.tensor([1, 3, 0]), prior=1.0)
    assert moved == [0, 1]
    r2 = 2**-0.5
    torch.testing.assert_close(w[0], torch.tensor([1.5 * r2, 1.5 * r2]))
    d = torch.tensor([0.25, 0.75]) / (0.25**2 + 0.75**2) ** 0.5
    torch.testing.assert_close(w[1], d * (0.25 * 1 + 0.75 * 2))
    torch.testing.assert_close(b, torch.tensor([-1.0, -2.0, -3.0]))  # (1-s) b0 + s b; row 2 (coverage 0) untouched
    assert torch.equal(w[2], torch.tensor([0.0, 2.0]))


def test_row_prior_exports_pulled_rows_and_resume_continues_from_the_trained_state(toy, effnet, tmp_path):
    kw = dict(target="label", init="cam", epochs=3, lr=3.0, schedule="onecycle", row_prior=1.0)
    train_fm(config(toy, tmp_path / "full", **kw))
    ckpt = load_checkpoint(str(tmp_path / "full" / "checkpoint.pt"))
    assert ckpt["config"]["row_prior"] == 1.0
    assert ckpt["extra"]["uncovered"]["prior"] == 1.0 and ckpt["extra"]["uncovered"]["blended"] == len(COVERED)
    raw = trainer_state_from_checkpoint(ckpt)["attention"]
    start = init_attention(effnet, 0, "cam").state_dict()
    w, w0, wt = (x["conv.weight"].flatten(1).double() for x in (ckpt["attention"], start, raw))
    counts = np.bincount(LABELS, minlength=1000)  # samples per class row in an epoch: 3, 2, 4, 1
    for k in COVERED:
        s = counts[k] / (counts[k] + 1.0)
        d = (1 - s) * w0[k] / w0[k].norm() + s * wt[k] / wt[k].norm()
        want = d / d.norm() * ((1 - s) * w0[k].norm() + s * wt[k].norm())
        torch.testing.assert_close(w[k], want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(
            ckpt["attention"]["conv.bias"][k].double(),
            (1 - s) * start["conv.bias"][k].double() + s * raw["conv.bias"][k].double(),
            atol=1e-6,
            rtol=1e-5,
        )
        assert not torch.equal(
            ckpt["attention"]["conv.weight"][k], raw["conv.weight"][k]
        )  # the trained row is kept apart
    assert torch.equal(ckpt["attention"]["conv.weight"][0], start["conv.weight"][0])  # uncovered: the start (init)
    # an interrupted run resumed from its pulled export continues from the trained rows: same result
    assert train_fm(config(toy, tmp_path / "cut", max_steps=4, **kw)).stopped_early
    train_fm(config(toy, tmp_path / "cut", resume=True, epochs=3))
    cut = load_checkpoint(str(tmp_path / "cut" / "checkpoint.pt"))
    for k in ckpt["attention"]:
        assert torch.equal(ckpt["attention"][k], cut["attention"][k])
        assert torch.equal(raw[k], trainer_state_from_checkpoint(cut)["attention"][k])
    # prior 0 on the same run (re-export, no step): the trained rows as they are
    assert cli_main(["train", "--out", str(tmp_path / "full"), "--resume", "--row-prior", "0", "--no-progress"]) == 0
    again = load_checkpoint(str(tmp_path / "full" / "checkpoint.pt"))
    assert again["step"] == ckpt["step"] and "prior" not in again["extra"]["uncovered"]
    for k in COVERED:
        assert torch.equal(again["attention"]["conv.weight"][k], raw["conv.weight"][k])


def test_row_prior_default_follows_the_recipe(toy, tmp_path):
    # the small-data recipe with a CAM start pulls by one sample; the SPEC recipe (random start) does not pull
    train_fm(config(toy, tmp_path / "small", target="label", recipe_rule="data-size", epochs=None, max_steps=1))
    assert load_checkpoint(str(tmp_path / "small" / "checkpoint.pt"))["config"]["row_prior"] == 1.0
    train_fm(config(toy, tmp_path / "spec", target="label", max_steps=1))
    assert load_checkpoint(str(tmp_path / "spec" / "checkpoint.pt"))["config"]["row_prior"] == 0.0
