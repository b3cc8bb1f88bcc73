"""The image processors paired with hf_detr models: transformers' own DETR processors.

`HfDetrImageProcessor` is transformers' DETR image processor: its post-processing takes a softmax
over num_labels + 1 classes and drops the last ("no object"), which fits the softmax class loss. Models
trained with a sigmoid class loss ("focal", "iou_aware") have no "no object" class; their processor is
transformers' Conditional DETR one, whose post-processing takes the top-k (query, class) pairs by
sigmoid score, and whose preprocessing is DETR's. `image_processor_for(config)` picks the one that fits;
`fit_image_processor(processor, config)` swaps a given processor of the other kind for the fitting one,
keeping its settings (train.py's --image_processor_name, scripts/evaluate.py's checkpoint processor).

Batches of images of different sizes in `pipeline("object-detection")`: the pipeline preprocesses each
image alone and concatenates the results, so images resized to different sizes cannot share a batch
(transformers' `_pad` fails). Set the processor's `pad_size` to the largest resized size, e.g.
`processor.pad_size = {"height": 1333, "width": 1333}` for `size={"shortest_edge": 800, "longest_edge":
1333}`, and pass it as `pipeline(..., image_processor=processor)`: every image is padded to it, so any batch
size gives the unbatched detections of that processor (tested). The padding costs time on small images and
changes DETR's outputs slightly (its backbone sees the padding at the image's borders), so it is not the
default.

Both write their own `image_processor_type` on save, which `AutoImageProcessor` and
`pipeline("object-detection")` resolve without hf_detr installed. transformers' default DETR processors
need torchvision; where torchvision is missing (as with the CPU torch wheel) the PIL backend does the
same work, so pick it directly instead of relying on transformers' fallback and its warning.
"""

import logging

from transformers.utils import is_torchvision_available

logger = logging.getLogger(__name__)

if is_torchvision_available():
    from transformers.models.conditional_detr.image_processing_conditional_detr import (
        ConditionalDetrImageProcessor as SigmoidImageProcessor,
    )
    from transformers.models.detr.image_processing_detr import DetrImageProcessor as HfDetrImageProcessor
else:
    from transformers.models.conditional_detr.image_processing_pil_conditional_detr import (
        ConditionalDetrImageProcessorPil as SigmoidImageProcessor,
    )
    from transformers.models.detr.image_processing_pil_detr import DetrImageProcessorPil as HfDetrImageProcessor


def image_processor_for(config, **kwargs):
    """The image processor for a model of `config` (an HfDetrConfig): HfDetrImageProcessor for the
    softmax class loss, the sigmoid top-k one otherwise. kwargs go to the processor (e.g. `size`)."""
    return (HfDetrImageProcessor if config.class_loss == "softmax" else SigmoidImageProcessor)(**kwargs)


# transformers' processors by their post-processing (class names without the backend's "Pil" / "Fast"):
# a softmax over num_labels + 1 classes dropping the last, or the top-k (query, class) pairs by sigmoid score
POST_PROCESSING = {
    "DetrImageProcessor": "softmax",
    "ConditionalDetrImageProcessor": "sigmoid",
    "DeformableDetrImageProcessor": "sigmoid",
}


def fit_image_processor(image_processor, config, name: str = "the image processor"):
    """`image_processor` when its post-processing fits `config.class_loss`; else `image_processor_for`'s
    class with the same settings (sizes, normalisation, ...), with a warning naming both. A softmax
    processor on a sigmoid ("focal", "iou_aware") model drops the last class as "no object", so that
    class is never output; a sigmoid one on a softmax model outputs "no object" as a class. Processors
    of other kinds, and models without a `class_loss` (not hf_detr's), are left as they are. `name` says
    where the processor came from in the warning."""
    kind = POST_PROCESSING.get(type(image_processor).__name__.removesuffix("Pil").removesuffix("Fast"))
    class_loss = getattr(config, "class_loss", None)
    if kind is None or class_loss is None or kind == ("softmax" if class_loss == "softmax" else "sigmoid"):
        return image_processor
    fitting = type(image_processor_for(config))
    harm = "its last class would never be output" if kind == "softmax" else "'no object' would be output as a class"
    logger.warning(
        f"{name} is a {type(image_processor).__name__}, whose post-processing takes a {kind} over the classes: it does "
        f"not fit a model trained with class_loss={class_loss!r} ({harm}); using a {fitting.__name__} with its settings"
    )
    return fitting.from_dict(image_processor.to_dict())


__all__ = ["HfDetrImageProcessor", "image_processor_for", "fit_image_processor"]
