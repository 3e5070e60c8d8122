"""sal_harness: the training and evaluation harness of sparse-attention-lab.

A small GPT (RMSNorm, RoPE, SwiGLU) whose attention is chosen by config -- ``dense``, ``window`` (a
sliding-window baseline), ``nsa`` (``nsa.NSAAttention``) or ``scope`` (``scope.ScopeAttention``) --
trained on offline data (real text shipped with Python, synthetic long-range retrieval tasks),
evaluated (held-out bits per byte, accuracy by distance and depth, NSA selection recall, SCOPE
pointer recall) and compared side by side in a report.

Modules: ``config`` (hydra composition + pydantic validation), ``data``, ``model``, ``generate``,
``checkpoint``, ``train``, ``distributed``, ``evaluate``, ``report``, ``compare`` (the main job),
``demo``. The attention packages (``nsa``, ``scope``) never import this one.
"""

__all__: list[str] = []
