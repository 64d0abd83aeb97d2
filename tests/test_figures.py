"""figures.py draws what the metrics say (cell values, names, variance shares, seeds), at 10 and 200 classes,
in bounded time; lacvit_dist/log.py turns a real evaluation pass into TensorBoard figures, text and PR curves."""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.decomposition import PCA
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import REPO
from dist_helpers import free_port
from lacvit_dist.evaluation import figures
from lacvit_dist.evaluation.passes import evaluate_classifier
from lacvit_dist.evaluation.metrics import confusion_matrix, per_class_accuracy, pr_curves, pr_histograms
from lacvit_dist.log import PRTally, TensorBoard, format_duration


def noisy_predictions(num_classes: int, n: int, hit: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    wrong = torch.randint(0, num_classes, (n,), generator=g)
    return torch.where(torch.rand(n, generator=g) < hit, labels, wrong), labels


def all_text(fig) -> str:
    """Every string drawn in the figure: titles, axis and tick labels, annotations, legends, tables."""
    fig.canvas.draw()  # tick labels exist only once drawn
    from matplotlib.text import Text
    cells = [cell.get_text() for ax in fig.axes for table in ax.tables for cell in table.get_celld().values()]
    return "\n".join(t.get_text() for t in fig.findobj(Text) + cells)


def rendered(fig) -> np.ndarray:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return np.asarray(Image.open(buf).convert("RGB"))


def names_for(c: int) -> list[str]:
    return [f"bird species {k}" for k in range(c)]


# -------------------------------------------------------------------------------------------- confusion
def test_confusion_cells_and_counts_equal_the_metric_matrix():
    preds, labels = noisy_predictions(10, 2000, 0.6, seed=0)
    cm = confusion_matrix(preds, labels, 10)
    cm[3] = 0  # a class without samples: its row is blank, not 0
    fig = figures.confusion_figure(cm, names_for(10))
    ax = fig.axes[0]
    shown = np.ma.filled(ax.images[0].get_array().astype(float), np.nan)
    m = cm.double().numpy()
    expected = m / m.sum(1, keepdims=True).clip(min=1)
    expected[3] = np.nan
    np.testing.assert_allclose(shown, expected, equal_nan=True)  # colour = the fraction of the true class
    counts = {(round(t.get_position()[1]), round(t.get_position()[0])): int(t.get_text()) for t in ax.texts}
    assert counts == {(r, c): int(cm[r, c]) for r in range(10) for c in range(10)}  # every cell's count
    text = all_text(fig)
    assert all(name in text for name in names_for(10))  # both axes named
    assert f"confusion matrix (10 classes, {int(cm.sum())} samples)" in text  # titles keep their spaces
    with pytest.raises(ValueError, match="2 class names for 10 classes"):
        figures.confusion_figure(cm, ["a", "b"])


def test_confusion_at_200_classes_lists_the_most_confused_pairs_not_the_names():
    preds, labels = noisy_predictions(200, 6000, 0.7, seed=1)
    preds[(labels == 17)] = 42  # every sample of class 17 goes to class 42 ...
    preds[(labels == 17).nonzero()[0]] = 17  # ... but one
    cm = confusion_matrix(preds, labels, 200)
    support17 = int((labels == 17).sum())
    pairs = figures.most_confused(cm, names_for(200))
    assert pairs[0] == ("bird species 17", "bird species 42", (support17 - 1) / support17, support17 - 1)
    assert all(a[2] >= b[2] for a, b in zip(pairs, pairs[1:])) and len(pairs) == figures.WORST_SHOWN
    fig = figures.confusion_figure(cm, names_for(200))
    text = all_text(fig)
    assert f"{pairs[0][2]:6.1%}  ({support17 - 1})  bird species 17 → bird species 42" in text
    tick_labels = [t.get_text() for t in fig.axes[0].get_xticklabels() + fig.axes[0].get_yticklabels()]
    assert tick_labels and not any("species" in t for t in tick_labels)  # indices, not 200 unreadable names
    assert not fig.axes[0].texts  # no 40,000 cell counts


# ----------------------------------------------------------------------------------------------- per class
@pytest.mark.parametrize("num_classes", [10, 200])
def test_per_class_figure_sorts_and_names_the_worst_classes(num_classes):
    preds, labels = noisy_predictions(num_classes, 30 * num_classes, 0.7, seed=2)
    preds[labels == 5] = (labels[labels == 5] + 1) % num_classes  # class 5: accuracy 0, the worst
    cm = confusion_matrix(preds, labels, num_classes)
    cm[7] = 0  # absent: left out, not drawn as a 0 bar
    acc, support = per_class_accuracy(cm)
    fig = figures.per_class_figure(acc, names_for(num_classes), support=support)
    named = fig.axes[-1]  # the named bars: every class at 10, the worst 20 at 200
    tick_names = [t.get_text() for t in named.get_yticklabels()]
    assert tick_names[0] == "bird species 5"  # the worst class first (top)
    assert "bird species 7" not in tick_names
    widths = [bar.get_width() for bar in named.patches]
    assert widths == sorted(widths) and widths[0] == 0.0  # sorted, worst first
    present = sorted(float(acc[k]) for k in range(num_classes) if k != 7)
    assert widths == pytest.approx(present[:len(widths)])
    text = all_text(fig)
    assert "bird species 5" in text and f"mean {np.mean(present):.3f}" in text
    assert f"({num_classes - 1} classes; 1 without samples left out)" in text


# --------------------------------------------------------------------------------------------- embeddings
def test_pca_axes_carry_the_explained_variance():
    g = torch.Generator().manual_seed(3)
    labels = torch.arange(600) % 4
    x = torch.randn(600, 16, generator=g) * torch.linspace(4, 0.5, 16) + 3 * F.one_hot(labels, 16)
    ref = PCA(n_components=2).fit(x.double().numpy())  # an independent implementation
    points, ratios = figures.pca(x)
    np.testing.assert_allclose(ratios, ref.explained_variance_ratio_, rtol=1e-9)
    np.testing.assert_allclose(np.abs(points), np.abs(ref.transform(x.double().numpy())), atol=1e-8)
    fig = figures.embedding_figure(x, labels, ["cat", "dog", "owl", "fox"])
    ax = fig.axes[0]
    assert ax.get_xlabel() == f"PC1 ({ref.explained_variance_ratio_[0]:.1%} of variance)"
    assert ax.get_ylabel() == f"PC2 ({ref.explained_variance_ratio_[1]:.1%} of variance)"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["cat", "dog", "owl", "fox"]
    with pytest.raises(ValueError, match="labels must lie in"):
        figures.embedding_figure(x, labels + 1, ["cat", "dog", "owl", "fox"])


def test_health_figure_plots_every_evaluation():
    history = [{"step": s, "knn_top1": 0.1 * s, "backbone/isotropy": 0.5 / s, "projection/isotropy": 0.2,
                "backbone/effective_rank": 3.0 + s} for s in (10, 20, 30)]
    fig = figures.health_figure(history)
    lines = {(ax.get_title(), line.get_label()): (list(line.get_xdata()), list(line.get_ydata()))
             for ax in fig.axes for line in ax.get_lines()}
    assert lines[("isotropy (1 = isotropic)", "backbone")] == ([10, 20, 30], [0.05, 0.025, 0.5 / 30])
    assert lines[("isotropy (1 = isotropic)", "projection")][1] == [0.2] * 3
    assert lines[("effective rank", "backbone")][1] == [13.0, 23.0, 33.0]
    assert {title for title, _ in lines} == {"kNN Top-1", "isotropy (1 = isotropic)", "effective rank"}


# ---------------------------------------------------------------------------------------- reproduce_small
def test_seed_bars_show_the_mean_and_every_seed_and_the_table_its_numbers():
    seeds = [[0.50, 0.60, 0.55], [0.70, 0.72, 0.69]]
    health = {"pretrained": {"knn_top1": 0.81234, "isotropy": 0.3}, "LaCViT stage 1": {"knn_top1": 0.9, "isotropy": 0.6}}
    scatter = ("p", torch.randn(40, 8, generator=torch.Generator().manual_seed(4)), torch.arange(40) % 2)
    fig = figures.reproduce_figure([("CE", seeds[0]), ("LaCViT", seeds[1])], health, ["knn_top1", "isotropy"],
                                   [scatter] * 3, ["five", "six"])
    bars_ax = fig.axes[0]
    assert [bar.get_height() for bar in bars_ax.patches] == pytest.approx([np.mean(s) for s in seeds])
    points = [sorted(c.get_offsets()[:, 1].tolist()) for c in bars_ax.collections if len(c.get_offsets()) == 3]
    assert points == [sorted(s) for s in seeds]  # one point per seed, at its own value
    text = all_text(fig)
    assert f"{np.mean(seeds[0]):.3f} ± {np.std(seeds[0], ddof=1):.3f}" in text
    assert "0.8123" in text and "LaCViT stage 1" in text and "knn_top1" in text
    with pytest.raises(ValueError):
        figures.seed_bars_figure(["one"], [[]])


# -------------------------------------------------------------------------------------------- time, files
def test_all_figures_build_and_render_for_10_and_200_classes_in_bounded_time():
    # CPU time of this process, not wall time: the bound must not depend on what else the machine runs (at a
    # load of 8 on 2 cores the wall time was 45 s for ~6 s of CPU). Drawing one text per cell at 200 classes
    # (40,000 of them) costs minutes of CPU, so 30 s catches that kind of regression with room to spare.
    start = time.process_time()
    for c in (10, 200):
        preds, labels = noisy_predictions(c, 20 * c, 0.6, seed=c)
        cm = confusion_matrix(preds, labels, c)
        acc, support = per_class_accuracy(cm)
        x = torch.randn(2000, 32, generator=torch.Generator().manual_seed(c))
        for fig in (figures.confusion_figure(cm, names_for(c)),
                    figures.per_class_figure(acc, names_for(c), support=support),
                    figures.embedding_figure(x, torch.arange(2000) % c, names_for(c))):
            img = rendered(fig)
            assert 300 < img.shape[0] < 2000 and 300 < img.shape[1] < 2000 and img.std() > 10
    assert time.process_time() - start < 30


def test_save_figure_is_atomic(tmp_path):
    fig = figures.embedding_figure(torch.randn(30, 4), torch.arange(30) % 3)
    path = figures.save_figure(fig, tmp_path / "sub" / "pca.png")
    assert [p.name for p in path.parent.iterdir()] == ["pca.png"] and oct(path.stat().st_mode)[-3:] == "644"
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (700, 600)
    before = path.read_bytes()
    with pytest.raises(ValueError):
        figures.save_figure(fig, path, dpi=-5)  # matplotlib refuses it mid-write
    assert path.read_bytes() == before and [p.name for p in path.parent.iterdir()] == ["pca.png"]


# ------------------------------------------------------------------------------------------- TensorBoard
def test_an_evaluation_pass_writes_figures_text_and_pr_curves(tmp_path):
    """A real classifier through evaluate_classifier, tapped for PR counts; the event file holds the figures,
    the most-confused table, the pooled curve and the per-class curves of the 20 worst of 30 classes, and
    the curves equal the ones computed from the raw scores."""
    c, n = 30, 600
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, c)).eval()
    images, labels = torch.randn(n, 3, 2, 2), torch.randint(0, c, (n,))
    batches = [(images[i:i + 64], labels[i:i + 64], []) for i in range(0, n, 64)]
    tally = PRTally(c)
    metrics = evaluate_classifier(model, tally.tap(model, batches), torch.device("cpu"), torch.float32, c, n, "test")
    assert not model._forward_hooks  # the tap leaves the model as it was
    hist = tally.histograms()
    with torch.no_grad():
        probs = model(images).softmax(-1)
    assert torch.equal(hist, pr_histograms(probs, labels))

    tb = TensorBoard(tmp_path, "stage2")
    tb.classifier_figures(metrics, [f"c{k}" for k in range(c)], hist, step=7, group="test")
    tb.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "tensors": 0}).Reload()
    assert set(events.Tags()["images"]) == {"stage2/test/confusion", "stage2/test/per_class_accuracy"}
    pr_tags = [t for t in events.Tags()["tensors"] if "/pr_curves/" in t]
    worst = sorted(range(c), key=lambda k: (metrics["per_class_accuracy"][k], k))[:20]
    assert sorted(pr_tags) == sorted(["stage2/test/pr_curves/all_classes"]
                                     + [f"stage2/test/pr_curves/{k:04d}_c{k}" for k in worst])
    assert "stage2/test/most_confused/text_summary" in events.Tags()["tensors"]
    stored = events.Tensors(f"stage2/test/pr_curves/{worst[0]:04d}_c{worst[0]}")[0]
    values = np.frombuffer(stored.tensor_proto.tensor_content, np.float32) if stored.tensor_proto.tensor_content \
        else np.array(stored.tensor_proto.float_val, np.float32)
    expected = pr_curves(hist[:, worst[0]:worst[0] + 1])
    np.testing.assert_allclose(values.reshape(6, -1)[5], expected["recall"][0].numpy(), rtol=1e-6)
    assert stored.step == 7


def test_format_duration():
    assert [format_duration(s) for s in (0, 12.4, 185, 3720, 90061)] == ["0s", "12s", "3m05s", "1h02m", "25h01m"]


# ---------------------------------------------------------------------------------------------- training
def test_training_log_shows_rate_per_gpu_and_eta_and_stage1_figures(digits_root, tmp_path):
    """2 ranks under torchrun, stage 1 for 2 steps: every log line carries images/s per GPU (the global rate
    divided by the world size) and an ETA; TensorBoard gets the PCA scatter and the health curves."""
    tiny = ["model.overrides.embed_dim=32", "model.overrides.depth=1", "model.overrides.num_heads=2",
            "model.proj_dim=16", "data.num_workers=0", "data.shuffle_buffer=50", "stage1.epochs=1",
            "stage1.steps_per_epoch=2", "stage1.micro_batch_size=8", "stage1.log_every_steps=1"]
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "train.py"), "--config", str(REPO / "configs" / "demo_digits.yaml"), f"data.root={digits_root}",
           f"run.output_dir={tmp_path}", "run.name=eta", "run.stages=[stage1]", *tiny]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    lines = re.findall(r"stage1 epoch 1 step (\d)/2 .* images_per_s (\S+) .* images/s/gpu (\S+)  eta (\S+)",
                       proc.stdout)
    assert [step for step, *_ in lines] == ["1", "2"], proc.stdout[-3000:]
    for _, total, per_gpu, eta in lines:
        assert float(per_gpu) == pytest.approx(float(total) / 2, rel=1e-3)
        assert re.fullmatch(r"(\d+h\d\dm|\d+m\d\ds|\d+s)", eta)
    assert lines[-1][3] == "0s"  # nothing left after the last step
    events = EventAccumulator(str(tmp_path / "eta" / "stage1" / "tb"), size_guidance={"images": 0}).Reload()
    assert {"stage1/val/embeddings_pca", "stage1/val/embedding_health"} <= set(events.Tags()["images"])
