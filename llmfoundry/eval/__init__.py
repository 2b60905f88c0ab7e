"""Evaluation: loss/perplexity over MDS streams and in-context-learning tasks (``scripts/eval.py``).

- ``llmfoundry.eval.perplexity``: ``evaluate_perplexity(model, batches)``
- ``llmfoundry.eval.icl_tasks``: ``ICLTaskConfig``, task files (``load_task_examples``), few-shot prompts
- ``llmfoundry.eval.icl``: ``evaluate_icl_task(model, tokenizer, task_cfg, ...)`` (log-likelihood scoring; generation
  tasks go to ``llmfoundry.eval.icl_generation``)
- ``llmfoundry.eval.evaluate``: ``EvalConfig``, ``load_eval_config(yaml, overrides)``, ``evaluate(cfg)``
"""
from llmfoundry.eval.icl import evaluate_icl_task
from llmfoundry.eval.icl_tasks import ICLTaskConfig
from llmfoundry.eval.perplexity import evaluate_perplexity

__all__ = ["ICLTaskConfig", "evaluate_icl_task", "evaluate_perplexity"]
