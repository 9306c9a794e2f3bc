"""Worked examples that use alignkern's ops end to end (run them with ``alignkern demo``).

``ica``: in-context alignment's synthetic experiment (Wang et al. 2024), reproduced with
``reward_attention`` in the model.

``evidence``: each self-correction loop against plain decoding on a small model trained here on
a task with checkable answers (multi-digit addition), with accuracy and cost.
"""
