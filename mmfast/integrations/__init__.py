"""Integrations with other libraries, imported on demand (mmfast does not depend on them).

* ``mmfast.integrations.transformers``: ``register()`` (``attn_implementation="mmfast"``),
  ``apply_mmfast_to_lxmert``, ``apply_mmfast_to_clip``.
* ``mmfast.integrations.open_clip``: ``apply_mmfast_to_open_clip`` and ``loss_from_open_clip``.
"""
