"""Classic baselines beside scratch: what a practitioner would try before any transfer.

`tfidf_logistic`: TF-IDF of word unigrams and bigrams + logistic regression (scikit-learn), on
exactly the labelled texts the strategies get (`sample_shots` with the same seed), scored on
the same test split with the same metrics. It needs the words, which is why prepared text
datasets keep raw text rather than one model's token ids.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from tl_core.data import PreparedDataset, sample_shots
from tl_core.data.text import strings_of
from tl_core.errors import UserError

TFIDF_LR = "tfidf-lr"


def _texts(data: PreparedDataset, split: str, rows=None) -> tuple[list[str], np.ndarray]:
    texts, labels = [], []
    for x, y in data.rows(split, rows).chunks():
        texts += strings_of(x)
        labels.append(y)
    return texts, np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)


def tfidf_logistic(data: PreparedDataset, shots: int | None, seed: int) -> dict:
    """Metrics of TF-IDF + logistic regression trained on `shots` texts per class (seed `seed`)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from tl_core.evaluate import classification_metrics

    if not data.text:
        raise UserError(f"{TFIDF_LR} is a baseline for text; {data.path} holds images")
    started = time.perf_counter()
    train_idx, _ = sample_shots(data.labels("train"), shots, seed, data.classes)
    texts, y = _texts(data, "train", train_idx)
    vectoriser = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    classifier = LogisticRegression(max_iter=1000, random_state=seed)
    classifier.fit(vectoriser.fit_transform(texts), y)
    test_texts, test_y = _texts(data, "test")
    probs = classifier.predict_proba(vectoriser.transform(test_texts))
    logits = torch.from_numpy(np.log(np.clip(probs, 1e-12, 1.0))).float()
    metrics = classification_metrics(logits, torch.from_numpy(test_y), data.classes).metrics
    return {"strategy": TFIDF_LR, "seed": seed, "metrics": metrics, "train_seconds": time.perf_counter() - started}
