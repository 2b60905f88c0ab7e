"""Evaluation: loss/perplexity over MDS streams and in-context-learning tasks (``scripts/eval.py``).

- ``llmfoundry.eval.perplexity``: ``evaluate_perplexity(model, batches)``
- ``llmfoundry.eval.icl``: ``ICLTaskConfig``, ``evaluate_icl_task(model, tokenizer, task_cfg, ...)``
- ``llmfoundry.eval.evaluate``: ``EvalConfig``, ``load_eval_config(yaml, overrides)``, ``evaluate(cfg)``
"""
from llmfoundry.eval.icl import ICLTaskConfig, evaluate_icl_task
from llmfoundry.eval.perplexity import evaluate_perplexity

__all__ = ["ICLTaskConfig", "evaluate_icl_task", "evaluate_perplexity"]
