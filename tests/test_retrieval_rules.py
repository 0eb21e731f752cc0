"""Retrieval with identical caption texts (one text, a hit on any image carrying it), and the per-row figure."""

import torch

from clip_ping.evaluation.retrieval import retrieval_metrics, retrieval_metrics_per_row


def _basis(n: int) -> torch.Tensor:
    return torch.eye(n)


def test_identical_texts_are_one_text_in_both_directions():
    # 3 images; captions: image 0 and image 1 share the text "A" (ids 0), image 2 has text "B" (id 1).
    # Image features: images 0 and 1 point at "A", image 2 between "A" and "B" but closer to "A".
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    images = torch.stack([a, a * 0.9 + b * 0.1, a * 0.6 + b * 0.4])
    texts = torch.stack([a, a, b])  # identical texts, identical embeddings
    text_to_image = torch.tensor([0, 1, 2])
    text_ids = torch.tensor([0, 0, 1])

    per_caption = retrieval_metrics(images, texts, text_to_image)
    grouped = retrieval_metrics(images, texts, text_to_image, text_ids=text_ids)
    assert grouped["n_distinct_texts"] == 2 and per_caption["n_distinct_texts"] == 3
    # without the rule, image 1's own caption ties with image 0's identical one and the tie counts against it
    assert per_caption["image_to_text"]["R@1"] < 100.0
    # with it, image 0 and 1 retrieve "A" first (correct); image 2 retrieves "A" first (wrong): 2 of 3
    assert abs(grouped["image_to_text"]["R@1"] - 200 / 3) < 1e-9
    # text -> image: 2 distinct queries; "A" finds image 0 or 1 first (both correct), "B" finds image 2 first
    assert grouped["text_to_image"]["R@1"] == 100.0
    # without the rule, the two "A" captions cannot both have their own image first
    assert per_caption["text_to_image"]["R@1"] < 100.0


def test_without_duplicates_the_rule_changes_nothing():
    torch.manual_seed(0)
    images, texts = torch.randn(12, 8), torch.randn(12, 8)
    plain = retrieval_metrics(images, texts)
    grouped = retrieval_metrics(images, texts, text_ids=torch.arange(12))
    assert plain["image_to_text"] == grouped["image_to_text"] and plain["text_to_image"] == grouped["text_to_image"]


def test_per_row_figure_breaks_ties_by_sort_order_and_counts_any_caption():
    # two images, three caption rows: image 0 has captions 0 and 1, image 1 has caption 2
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])  # caption 0 looks like image 1
    out = retrieval_metrics_per_row(images, texts, torch.tensor([0, 0, 1]), ks=(1, 2))
    # text -> image: caption 0 misses at 1, captions 1 and 2 hit
    assert abs(out["text_to_image"]["R@1"] - 200 / 3) < 1e-9 and out["text_to_image"]["R@2"] == 100.0
    # image 0's best caption is caption 1 (a hit); image 1's top-1 is caption 0 or 2 (tie; sort order decides)
    top = (images[1:] @ texts.T).topk(1).indices.item()
    assert out["image_to_text"]["R@1"] == (100.0 if top == 2 else 50.0)
