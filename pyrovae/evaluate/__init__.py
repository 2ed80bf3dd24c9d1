"""Evaluation beside the models: the judge classifier and the sample-quality
scores in its features (Fréchet distance, KID, precision and recall)."""

from pyrovae.evaluate.judge import Judge, JudgeConfig, judge_for, train_judge
from pyrovae.evaluate.metrics import frechet_distance, kernel_distance, precision_recall, sample_scores

__all__ = [
    "Judge",
    "JudgeConfig",
    "judge_for",
    "train_judge",
    "frechet_distance",
    "kernel_distance",
    "precision_recall",
    "sample_scores",
]
