"""Evaluation protocols against results worked out by hand on tiny data."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.eval.config import EvalConfig
from pipeline.eval.embed import embedding_map
from pipeline.eval.finetune import _rebatch, augment, label_subset
from pipeline.eval.knn import knn_accuracy, knn_predict, topk_accuracy
from pipeline.eval.linear import linear_probe, standardise, train_linear
from pipeline.eval.report import write_report

# Bank on the unit circle: (1, 0) class 0, (0, 1) class 1, (1, 1)/sqrt2 class 1, (-1, 0) class 2.
BANK = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [-1.0, 0.0]])  # norms differ: cosine ignores them
BANK_Y = torch.tensor([0, 1, 1, 2])


def test_knn_scores_match_hand_computation():
    query = torch.tensor([[2.0, 0.0]])  # cos sims with the bank: 1, 0, 1/sqrt2, -1
    s = 1 / math.sqrt(2)
    scores = knn_predict(BANK, BANK_Y, query, num_classes=3, k=2, temperature=0.1)
    # top-2 neighbours: (1,0) sim 1 -> class 0; (1,1) sim 0.707 -> class 1
    torch.testing.assert_close(scores, torch.tensor([[math.exp(10), math.exp(10 * s), 0.0]]))
    scores = knn_predict(BANK, BANK_Y, query, num_classes=3, k=4, temperature=0.5)
    expected = [[math.exp(2), math.exp(2 * s) + math.exp(0), math.exp(-2)]]
    torch.testing.assert_close(scores, torch.tensor(expected))


def test_knn_weighting_can_outvote_the_majority():
    # Query near class 0's single sample; two class-1 samples are further away. Unweighted k=3 majority
    # would say class 1; with T=0.1 the close neighbour's weight e^{10*0.995} dominates.
    bank = torch.tensor([[1.0, 0.1], [0.0, 1.0], [0.3, 1.0]])
    y = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    acc = knn_accuracy(bank, y, query, torch.tensor([0]), num_classes=2, k=3, temperature=0.1)
    assert acc == {"top1": 1.0, "top5": 1.0}
    acc = knn_accuracy(bank, y, query, torch.tensor([0]), num_classes=2, k=3, temperature=100.0)
    assert acc["top1"] == 0.0


def test_knn_accuracy_top1_top5_and_chunking():
    query = torch.tensor([[1.0, 0.1], [-1.0, 0.2], [0.1, 1.0], [0.9, 0.1]])
    labels = torch.tensor([0, 2, 1, 2])  # the last one is wrong on purpose: 3/4 top-1
    acc = knn_accuracy(BANK, BANK_Y, query, labels, num_classes=3, k=1, temperature=0.1)
    assert acc == {"top1": 0.75, "top5": 1.0}
    full = knn_predict(BANK, BANK_Y, query, num_classes=3, k=3)
    chunked = knn_predict(BANK, BANK_Y, query, num_classes=3, k=3, chunk_size=1)
    torch.testing.assert_close(full, chunked)


def test_topk_accuracy_by_hand():
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05]])
    acc = topk_accuracy(scores, torch.tensor([2, 0]), ks=(1, 2))
    assert acc == {"top1": 0.5, "top2": 1.0}


def test_eval_config_validates():
    assert EvalConfig().k == 200 and EvalConfig().temperature == 0.1
    with pytest.raises(ConfigError, match=r"eval\.k"):
        EvalConfig(k=0)
    with pytest.raises(ConfigError, match=r"eval\.temperature"):
        EvalConfig(temperature=0.0)


def test_standardise_uses_train_statistics():
    train = torch.tensor([[1.0, 10.0], [3.0, 10.0]])  # mean (2, 10), std (1, 0 -> clamped)
    test = torch.tensor([[5.0, 10.0]])
    train_s, test_s = standardise(train, test)
    torch.testing.assert_close(train_s, torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))
    torch.testing.assert_close(test_s, torch.tensor([[3.0, 0.0]]))


def test_linear_probe_on_separable_data_with_one_mislabelled_test_point():
    gen = torch.Generator().manual_seed(0)
    # Class = sign of the first feature; the second feature is noise.
    x = torch.cat([torch.rand(40, 1, generator=gen) + 0.5, torch.randn(40, 1, generator=gen)], dim=1)
    x[20:, 0] *= -1
    y = torch.tensor([1] * 20 + [0] * 20)
    test_x = torch.tensor([[2.0, 0.0], [-2.0, 0.5], [1.5, -1.0], [-1.5, 0.0]])
    test_y = torch.tensor([1, 0, 1, 1])  # the last is on class 0's side: exactly 3/4
    result = linear_probe(
        x, y, test_x, test_y, num_classes=2, learning_rates=(0.1, 0.01), weight_decays=(0.0,), epochs=20
    )
    assert result["top1"] == 0.75 and result["top5"] == 1.0
    assert len(result["sweep"]) == 2 and result["lr"] in (0.1, 0.01)
    assert all(r["holdout_top1"] == 1.0 for r in result["sweep"])


def test_train_linear_reaches_the_separating_direction():
    x = torch.tensor([[1.0, 0.0], [2.0, 1.0], [-1.0, 0.0], [-2.0, -1.0]])
    y = torch.tensor([1, 1, 0, 0])
    probe = train_linear(x, y, num_classes=2, lr=0.5, weight_decay=0.0, epochs=50, batch_size=4)
    w = probe.weight[1] - probe.weight[0]  # decision direction for class 1
    assert w[0] > 0 and (probe(x).argmax(1) == y).all()


def test_label_subset_is_class_balanced_and_seeded():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    keep = label_subset(labels, 0.1, seed=1)
    assert [int(keep[labels == c].sum()) for c in range(3)] == [5, 3, 2]
    assert torch.equal(keep, label_subset(labels, 0.1, seed=1))
    assert int(label_subset(labels, 0.01).sum()) == 3  # at least one per class


def test_rebatch_keeps_masked_samples_in_full_batches():
    loader = [
        (torch.arange(i, i + 4).float().view(4, 1, 1, 1).expand(4, 3, 2, 2), torch.arange(i, i + 4))
        for i in (0, 4, 8)
    ]
    keep = torch.zeros(12, dtype=torch.bool)
    keep[[1, 2, 5, 9, 10, 11]] = True
    batches = list(_rebatch(loader, keep, batch_size=4))
    assert [y.tolist() for _, y in batches] == [[1, 2, 5, 9], [10, 11]]
    assert batches[0][0][:, 0, 0, 0].tolist() == [1.0, 2.0, 5.0, 9.0]


def test_augment_shifts_and_flips_but_keeps_shape():
    images = torch.randn(8, 3, 16, 16)
    out = augment(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and not torch.equal(out, images)


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_embedding_map_writes_png(tmp_path, method):
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(30) % 3
    feats = torch.randn(30, 16, generator=gen) + 5 * torch.eye(16)[labels]
    png = embedding_map(
        feats, labels, tmp_path / "maps" / "m.png", method=method, class_names=["a", "b", "c"]
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 3000


def test_embedding_map_rejects_unknown_method(tmp_path):
    with pytest.raises(ValueError, match="pca"):
        embedding_map(torch.randn(5, 2), torch.zeros(5), tmp_path / "x.png", method="lda")


def test_report_writes_markdown_and_html(tmp_path):
    run, out = tmp_path / "run", tmp_path / "run" / "eval"
    out.mkdir(parents=True)
    rows = [{"step": s, "epoch": s // 5, "loss": 5.0 - 0.1 * s, "lr": 0.1} for s in range(1, 11)]
    rows += [{"step": 5, "epoch": 0, "knn_top1": 0.3}, {"step": 10, "epoch": 1, "knn_top1": 0.4}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "config.yaml").write_text("run:\n  name: unit\n")
    result = {
        "protocol": "knn",
        "backbone": "tiny pretrained",
        "top1": 0.4123,
        "top5": 0.9,
        "details": {"k": 200},
    }
    (out / "knn-pretrained.json").write_text(json.dumps(result))
    embedding_map(torch.randn(30, 4), torch.arange(30) % 3, out / "embedding_map-pca-pretrained.png")
    md, page = write_report(run, out, title="unit")
    text = md.read_text()
    assert "| knn | tiny pretrained | 41.2% | 90.0% | k=200 |" in text
    assert "![Loss and kNN curves](curves.png)" in text and "name: unit" in text
    assert "last 40.0%" in text and (out / "curves.png").stat().st_size > 5000
    body = page.read_text()
    assert body.count("data:image/png;base64,") == 2 and "41.2%" in body
