"""Evaluation of a checkpoint: validation loss per source, LAMBADA in RNN mode, and the lm-eval adapter."""

from rwkv5.eval.evaluate import evaluate_checkpoint, flat_metrics, format_table, write_report
from rwkv5.eval.lambada import lambada_eval

__all__ = ["evaluate_checkpoint", "flat_metrics", "format_table", "write_report", "lambada_eval"]
