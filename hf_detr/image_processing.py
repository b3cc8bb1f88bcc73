"""The image processors paired with hf_detr models: transformers' own DETR processors.

`HfDetrImageProcessor` is transformers' DETR image processor: its post-processing takes a softmax
over num_labels + 1 classes and drops the last ("no object"), which fits the softmax class loss. Models
trained with a sigmoid class loss ("focal", "iou_aware") have no "no object" class; their processor is
transformers' Conditional DETR one, whose post-processing takes the top-k (query, class) pairs by
sigmoid score, and whose preprocessing is DETR's. `image_processor_for(config)` picks the one that fits.

Both write their own `image_processor_type` on save, which `AutoImageProcessor` and
`pipeline("object-detection")` resolve without hf_detr installed. transformers' default DETR processors
need torchvision; where torchvision is missing (as with the CPU torch wheel) the PIL backend does the
same work, so pick it directly instead of relying on transformers' fallback and its warning.
"""

from transformers.utils import is_torchvision_available

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


__all__ = ["HfDetrImageProcessor", "image_processor_for"]
