"""hf_detr: DETR (DEtection TRansformer) packaged the Hugging Face way.

`import hf_detr` registers the model with AutoConfig, AutoModel, AutoModelForObjectDetection and
AutoImageProcessor.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForObjectDetection

from .box_ops import cxcywh_to_xyxy, generalized_box_iou, xyxy_to_cxcywh
from .configuration_hf_detr import HfDetrConfig
from .convert import convert_transformers_detr
from .explain import Explanation, explain
from .image_processing import HfDetrImageProcessor, image_processor_for
from .layers import CROSS_ATTENTION, ENCODER_ATTENTION
from .loss import CLASS_LOSSES, SetCriterion
from .matching import MATCHERS, HungarianMatcher
from .modeling_hf_detr import HfDetrForObjectDetection, HfDetrModel, HfDetrPreTrainedModel
from .targets import Targets
from .queries import QUERY_BUILDERS, AnchorQueries, ConditionalQueries, DeformableQueries, DetrQueries, QueryBuilder

AutoConfig.register(HfDetrConfig.model_type, HfDetrConfig, exist_ok=True)
AutoModel.register(HfDetrConfig, HfDetrModel, exist_ok=True)
AutoModelForObjectDetection.register(HfDetrConfig, HfDetrForObjectDetection, exist_ok=True)
AutoImageProcessor.register(HfDetrConfig, image_processor_classes={"pil": HfDetrImageProcessor}, exist_ok=True)

__version__ = "0.1.0"
__all__ = [
    "HfDetrConfig",
    "HfDetrModel",
    "HfDetrForObjectDetection",
    "HfDetrPreTrainedModel",
    "HfDetrImageProcessor",
    "image_processor_for",
    "HungarianMatcher",
    "SetCriterion",
    "QueryBuilder",
    "DetrQueries",
    "ConditionalQueries",
    "AnchorQueries",
    "DeformableQueries",
    "QUERY_BUILDERS",
    "CLASS_LOSSES",
    "ENCODER_ATTENTION",
    "CROSS_ATTENTION",
    "Targets",
    "MATCHERS",
    "convert_transformers_detr",
    "explain",
    "Explanation",
    "cxcywh_to_xyxy",
    "xyxy_to_cxcywh",
    "generalized_box_iou",
]
