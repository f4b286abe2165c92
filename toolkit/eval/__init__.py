"""Evaluation: grounding Acc@IoU>=0.5 (with the invalid-answer rate) and VQA exact match."""
from toolkit.eval.evaluate import evaluate_grounding, evaluate_vqa, grounding_baselines, vqa_baselines

__all__ = ["evaluate_grounding", "evaluate_vqa", "grounding_baselines", "vqa_baselines"]
