"""What the run plots show: per-step curves with their moving average and epoch means, AUC in the ROC legend, R² on
the predicted-vs-true panels, the run's name in every title. Read from the Figure before it is saved."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import r2_score, roc_auc_score

from ssl_lab.errors import DataError
from ssl_lab.evaluation import plots
from ssl_lab.evaluation.plots import (make_confusion, make_curves, make_pred_vs_true, make_roc, read_step_curves,
                                      smooth, smoothing_span)
from ssl_lab.tasks.outputs import write_outputs

COLS = ["epoch", "step", "train/embedding_std", "train/images_per_s", "train/loss_epoch", "train/loss_step",
        "train/off_diag_epoch", "train/off_diag_step", "lr-SGD"]


def _csv(path, rows, cols=COLS):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [",".join(cols)] + [",".join("" if r.get(c) is None else repr(r[c]) for c in cols) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def _pretrain_rows(steps, steps_per_epoch, seed=0):
    """Rows as Lightning's CSVLogger writes a pretraining run: one per step, one more at each epoch's end."""
    rng = np.random.default_rng(seed)
    rows, loss, epoch_rows = [], {}, {}
    for s in steps:
        e = s // steps_per_epoch
        value = float(5 * np.exp(-s / 20) + rng.normal(0, 0.2))
        rows.append({"epoch": e, "step": s, "train/embedding_std": 0.5, "train/images_per_s": 100.0,
                     "train/loss_step": value, "train/off_diag_step": value / 3, "lr-SGD": 0.1 - s * 1e-3})
        loss.setdefault(e, []).append(value)
        if (s + 1) % steps_per_epoch == 0:
            epoch_rows[e] = (s, float(np.mean(loss[e])))
            rows.append({"epoch": e, "step": s, "train/loss_epoch": epoch_rows[e][1],
                         "train/off_diag_epoch": epoch_rows[e][1] / 3})
    return rows, epoch_rows


def _axis(fig, ylabel):
    return next(ax for ax in fig.axes if ax.get_visible() and ax.get_ylabel() == ylabel)


def _line(ax, gid, label=None):
    found = [ln for ln in ax.get_lines() if ln.get_gid() == gid and (label is None or ln.get_label().startswith(label))]
    assert len(found) == 1, [(ln.get_gid(), ln.get_label()) for ln in ax.get_lines()]
    return found[0]


def _reference_ema(values, span):
    """The moving average written as the weighted mean it is, not as the recursion plots.smooth uses."""
    decay = 1 - 2 / (span + 1)
    return np.array([sum(decay ** (i - k) * values[k] for k in range(i + 1)) / sum(decay ** j for j in range(i + 1))
                     for i in range(len(values))])


def test_pretraining_curves_show_every_step_smoothed_with_epoch_means(tmp_path):
    rows, epochs = _pretrain_rows(range(60), steps_per_epoch=20)
    path = tmp_path / "run_a" / "logs" / "version_0" / "metrics.csv"
    _csv(path, rows)
    fig = make_curves([path], run_name="run_a")
    assert "run_a" in fig._suptitle.get_text()
    loss = _axis(fig, "loss")
    raw = _line(loss, "raw")
    steps = [r["train/loss_step"] for r in rows if "train/loss_step" in r]
    assert list(raw.get_xdata()) == list(range(60)) and np.allclose(raw.get_ydata(), steps)
    span = smoothing_span(60)
    assert span > 1
    smoothed = _line(loss, "smoothed")
    assert len(smoothed.get_xdata()) == 60 and np.allclose(smoothed.get_ydata(), _reference_ema(steps, span))
    assert np.std(np.diff(smoothed.get_ydata())) < np.std(np.diff(steps))  # smoother than the raw steps
    marks = _line(loss, "epoch")
    assert list(marks.get_xdata()) == [s for s, _ in epochs.values()]  # each epoch mean at its last step
    assert np.allclose(marks.get_ydata(), [m for _, m in epochs.values()])
    # the loss term and the collapse monitor have panels; throughput has none; the learning rate comes last, raw
    assert len(_line(_axis(fig, "off_diag"), "raw").get_xdata()) == 60
    assert len(_line(_axis(fig, "embedding_std"), "raw").get_xdata()) == 60
    labels = {ax.get_ylabel() for ax in fig.axes if ax.get_visible()}
    assert labels == {"loss", "off_diag", "embedding_std", "lr"}
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert visible[0].get_ylabel() == "loss" and visible[-1].get_ylabel() == "lr"
    lr = _line(visible[-1], "raw")
    assert np.allclose(lr.get_ydata(), [0.1 - s * 1e-3 for s in range(60)])
    assert not [ln for ln in visible[-1].get_lines() if ln.get_gid() == "smoothed"]
    plots.plt.close(fig)


def test_resumed_run_continues_from_the_checkpoint_step(tmp_path):
    # the stopped run logged steps 0..9; its checkpoint was at step 6, where version_1 starts again
    old, _ = _pretrain_rows(range(10), steps_per_epoch=100, seed=1)
    new, _ = _pretrain_rows(range(6, 13), steps_per_epoch=100, seed=2)
    v0, v1 = (tmp_path / f"logs/version_{i}/metrics.csv" for i in (0, 1))
    _csv(v0, old)
    _csv(v1, new)
    curves = read_step_curves([v1, v0])  # read in version order whatever the order given
    points = curves["train/loss_step"]
    assert [p.step for p in points] == list(range(13))
    assert [p.value for p in points] == pytest.approx([r["train/loss_step"] for r in old[:6] + new])
    fig = make_curves([v0, v1])
    raw = _line(_axis(fig, "loss"), "raw")
    assert list(raw.get_xdata()) == list(range(13))
    # no epoch ended: the epoch mean is averaged from the step values, drawn at the last step
    marks = _line(_axis(fig, "loss"), "epoch")
    assert list(marks.get_xdata()) == [12] and marks.get_ydata()[0] == pytest.approx(np.mean(raw.get_ydata()))
    plots.plt.close(fig)


def test_downstream_curves_put_train_steps_and_val_epochs_on_one_panel(tmp_path):
    cols = ["epoch", "step", "train/loss", "train/acc", "val/loss", "val/acc"]
    rows = []
    for e in range(3):
        for s in (2 * e, 2 * e + 1):
            rows.append({"epoch": e, "step": s, "train/loss": 2.0 - 0.3 * s, "train/acc": 0.1 * s})
        rows.append({"epoch": e, "step": 2 * e + 1, "val/loss": 1.9 - 0.4 * e, "val/acc": 0.3 + 0.2 * e})
    path = tmp_path / "logs/version_0/metrics.csv"
    _csv(path, rows, cols)
    fig = make_curves([path], run_name="linear")
    loss = _axis(fig, "loss")
    assert list(_line(loss, "raw", "train/loss").get_ydata()) == pytest.approx([2.0 - 0.3 * s for s in range(6)])
    val = _line(loss, "epoch", "val/loss")
    assert list(val.get_xdata()) == [1, 3, 5] and list(val.get_ydata()) == pytest.approx([1.9, 1.5, 1.1])
    assert list(_line(_axis(fig, "acc"), "epoch", "val/acc").get_ydata()) == pytest.approx([0.3, 0.5, 0.7])
    plots.plt.close(fig)
    only_speed = tmp_path / "speed/version_0/metrics.csv"
    _csv(only_speed, [{"epoch": 0, "step": 0, "train/images_per_s": 3.0}], ["epoch", "step", "train/images_per_s"])
    with pytest.raises(DataError, match="no loss or accuracy"):
        make_curves([only_speed])


def test_smooth_is_the_debiased_moving_average():
    values = [4.0, 1.0, 3.0, 0.0, 2.0]
    assert smooth(values, 1) == pytest.approx(values)  # span 1: no smoothing
    assert smooth(values, 3) == pytest.approx(_reference_ema(values, 3))
    assert smooth(values, 3)[0] == 4.0  # not pulled towards zero at the start


def test_roc_legend_has_each_class_auc_and_the_title_the_macro_auc():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat(20)
    logits = torch.randn(60, 3, generator=g) + 1.5 * torch.nn.functional.one_hot(y, 3)
    probs = torch.softmax(logits, 1).numpy()
    fig = make_roc(torch.from_numpy(probs), y, ["lens", "sub", "none"], run_name="7_joint_run")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    expected = [roc_auc_score(y.numpy() == c, probs[:, c]) for c in range(3)]
    assert labels == [f"{name} (AUC {auc:.3f})" for name, auc in zip(["lens", "sub", "none"], expected)]
    macro = roc_auc_score(y.numpy(), probs, multi_class="ovr", average="macro")
    assert ax.get_title() == f"7_joint_run: ROC, macro AUC {macro:.3f}"
    plots.plt.close(fig)

    p1 = np.array([0.1, 0.4, 0.35, 0.8, 0.7, 0.9])
    yb = np.array([0, 0, 1, 1, 0, 1])
    fig = make_roc(np.stack([1 - p1, p1], 1), yb, ["n", "p"], run_name="bin")
    auc = roc_auc_score(yb, p1)
    assert auc == pytest.approx(7 / 9)
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [f"p (AUC {auc:.3f})"]
    assert fig.axes[0].get_title() == f"bin: ROC, AUC {auc:.3f}"
    plots.plt.close(fig)


def test_pred_vs_true_panels_carry_r2():
    g = torch.Generator().manual_seed(0)
    true = torch.randn(40, 2, generator=g)
    pred = true + 0.3 * torch.randn(40, 2, generator=g)
    pred[:, 1] = -pred[:, 1]  # a target predicted badly: negative R²
    fig = make_pred_vs_true(pred, true, ["mass", "pt"], run_name="run_b")
    titles = [ax.get_title() for ax in fig.axes]
    r2 = [r2_score(true[:, j].numpy(), pred[:, j].numpy()) for j in range(2)]
    assert r2[0] > 0.8 and r2[1] < 0
    assert titles == [f"mass: R² = {r2[0]:.3f}", f"pt: R² = {r2[1]:.3f}"]
    assert "run_b" in fig._suptitle.get_text()
    plots.plt.close(fig)
    fig = make_pred_vs_true(torch.ones(5), torch.ones(5), ["mass"])  # constant target: R² is undefined
    assert fig.axes[0].get_title() == "mass: R² = n/a"
    plots.plt.close(fig)


def test_confusion_title_names_the_run():
    fig = make_confusion([[5, 1], [2, 7]], ["a", "b"], run_name="3_finetune_x")
    assert fig.axes[0].get_title() == "3_finetune_x: confusion matrix"
    plots.plt.close(fig)


def test_run_outputs_title_every_plot_with_the_run_dir_name(tmp_path, monkeypatch):
    run_dir = tmp_path / "5_joint_simclr"
    rows, _ = _pretrain_rows(range(4), steps_per_epoch=2)
    _csv(run_dir / "logs/version_0/metrics.csv", rows)
    titles = {}

    def record(fig, path):
        titles[path.name] = " ".join([fig._suptitle.get_text() if fig._suptitle else ""]
                                     + [ax.get_title() for ax in fig.axes])
        plots.plt.close(fig)
        return path

    monkeypatch.setattr(plots, "save_figure", record)
    probs = torch.tensor([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.1, 0.9]])
    y = torch.tensor([0, 1, 1, 1])
    metrics = {"test": {"confusion_matrix": [[1, 0], [1, 2]]}}
    preds = {"probs": probs, "y": y, "pred": torch.tensor([1.0, 2.0, 3.0, 4.5]),
             "targets": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    write_outputs(run_dir, "joint", {"task": "joint"}, metrics, preds, ["no", "yes"], ["mass"])
    assert set(titles) == {"curves.png", "confusion_matrix.png", "roc.png", "pred_vs_true.png"}
    assert all("5_joint_simclr" in text for text in titles.values()), titles
    assert f"R² = {r2_score([1, 2, 3, 4], [1, 2, 3, 4.5]):.3f}" in titles["pred_vs_true.png"]
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics
