"""Large-batch CLIP training on mmfast's fused contrastive loss.

* ``GradCache(image_model, text_model, loss_fn, chunk_size).step(images, texts)``: the gradient
  of a batch far larger than the towers' activations allow (``gradcache.py``).
* ``python -m mmfast.train``: a CLIP trained end to end (model builders in ``models.py``, data in
  ``synthetic.py`` / ``datasets.py`` / ``loader.py``, the loop in ``trainer.py``, blocked
  recall@K and zero-shot in ``evaluate.py``, the command line in ``cli.py``).

Only GradCache is imported here; the rest (transformers, torchvision, ...) loads on use.
"""

from mmfast.train.gradcache import GradCache, split_inputs

__all__ = ["GradCache", "split_inputs"]
