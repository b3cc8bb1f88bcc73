"""The image processor paired with hf_detr models: transformers' own DETR image processor.

Its `save_pretrained` writes `"image_processor_type": "DetrImageProcessor"`, which
`AutoImageProcessor` and `pipeline("object-detection")` resolve without hf_detr installed.
transformers' default DETR processor needs torchvision; where torchvision is missing (as with
the CPU torch wheel) the PIL backend does the same work, so pick it directly instead of relying
on transformers' fallback and its warning.
"""

from transformers.utils import is_torchvision_available

if is_torchvision_available():
    from transformers.models.detr.image_processing_detr import DetrImageProcessor as HfDetrImageProcessor
else:
    from transformers.models.detr.image_processing_pil_detr import DetrImageProcessorPil as HfDetrImageProcessor

__all__ = ["HfDetrImageProcessor"]
