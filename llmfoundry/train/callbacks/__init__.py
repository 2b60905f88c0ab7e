"""The composer callbacks of a run, one file each, built from ``callbacks:`` (and ``icl_tasks:``) of the YAML by
``llmfoundry.train.builders.build_callbacks`` (``train.py`` for the in-run ICL evaluation):

- ``loss_guard.py``: ``stop_on_nonfinite_loss`` (on by default) and ``loss_spike``
- ``time_limit.py``: ``time_limit`` (save and exit 0 before a wall time)
- ``monitors.py``: ``optimizer_monitor`` (gradient and weight norms)
- ``hf_checkpoint.py``: ``hf_checkpoint`` (Hugging Face folders while training)
- ``sample_generations.py``: ``sample_generations`` (fixed prompts, every N batches)
- ``icl_eval.py``: ``icl_tasks`` / ``eval_gauntlet`` scored at the eval points
- ``profiler.py``: ``profiler`` (a torch.profiler trace of two batches)
"""
