"""The learning check fails when learning fails: the recipe with its fine-tuning labels shifted by
one token (each answer token trained to predict the token after its successor), everything else
as `make learning-check` ran it, gives a held-out answer loss that the check refuses.

Runs after `python -m learning.run` (make learning-check), on its working folder: the broken
fine-tuning starts from the same Pretrained-Only checkpoint, with the same data, settings and seed.
"""

from __future__ import annotations

import numpy as np
import pytest

from asclepius_r.train import finetune
from learning import run as learning

pytestmark = pytest.mark.learning


@pytest.fixture(scope="module")
def learned():
    if not (learning.WORKDIR / "results/evaluation/summary.json").exists():
        pytest.skip("no learning check results: run `python -m learning.run` first (make learning-check does)")
    return learning.figures(learning.WORKDIR)


def labels_shifted_by_one(example) -> np.ndarray:
    """The defect: the labels one token early, so the model (which shifts them itself) learns t+2."""
    labels = np.array(example.input_ids, dtype=np.int64)
    labels[: example.prompt_tokens] = finetune.IGNORE_INDEX
    return np.append(labels[1:], finetune.IGNORE_INDEX)


def test_the_recipe_passes_the_learning_check(learned):
    assert learning.failures(learned) == []


def test_a_recipe_with_labels_shifted_by_one_fails_the_learning_check(learned, tmp_path, monkeypatch):
    monkeypatch.setattr(finetune.Example, "labels", property(labels_shifted_by_one))
    model = learning.retrain(learning.WORKDIR, "finetune", tmp_path)
    losses = learning.heldout_figures(learning.WORKDIR, model, tmp_path / "losses.json")
    broken = {**learned, "answer_loss_asclepius": losses["answer_loss"]}
    print(learning.result_line(broken))
    assert [problem.split(":")[0] for problem in learning.failures(broken)] == ["fine-tuning did not learn"]
