"""The learning check fails when learning fails: the recipe with its fine-tuning labels shifted by
one token (each answer token trained to predict the token after its successor), everything else
as `make learning-check` ran it, gives a held-out answer loss that the check refuses.

Runs after `python -m learning.run` (make learning-check), on its working folder: the broken
fine-tuning starts from the same Pretrained-Only checkpoint, with the same data and settings.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from asclepius_r import config as workflow_config
from asclepius_r.evaluate.losses import heldout_losses
from asclepius_r.train import finetune
from asclepius_r.train.run import TrainRun
from asclepius_r.train.settings import training_settings
from learning import run as learning

pytestmark = pytest.mark.learning


@pytest.fixture(scope="module")
def learned():
    results = learning.WORKDIR / "results"
    if not (results / "evaluation/summary.json").exists():
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
    workdir = learning.WORKDIR
    config = workflow_config.resolve(yaml.safe_load((learning.REPO / "learning/config.yaml").read_text()))
    overlay = yaml.safe_load((workdir / "results/learning/overlay.yaml").read_text())
    config = workflow_config.resolve(workflow_config.merge(config, overlay))
    monkeypatch.chdir(workdir)
    run = TrainRun(
        base_model=f"results/models/{learning.PRETRAINED}",
        data="results/mimiciii_discharge.csv",
        output_dir=str(tmp_path / "broken"),
        checkpoint_dir=str(tmp_path / "checkpoints"),
        metrics_file=str(tmp_path / "metrics.jsonl"),
        **training_settings(config, "finetune", learning.NAME),
    )
    run_file = tmp_path / "run.json"
    run_file.write_text(json.dumps(run.__dict__))
    monkeypatch.setattr(finetune.Example, "labels", property(labels_shifted_by_one))
    finetune.main(str(run_file))
    losses = heldout_losses(
        tmp_path / "broken",
        "results/notes/heldout.parquet",
        "results/instructions/heldout.jsonl",
        tmp_path / "losses.json",
        max_length=config["evaluate"]["loss_max_length"],
        truncation=run.truncation,
        gpus=0,
    )
    broken = {**learned, "answer_loss_asclepius": losses["answer_loss"]}
    print(learning.result_line(broken))
    assert [problem.split(":")[0] for problem in learning.failures(broken)] == ["fine-tuning did not learn"]
