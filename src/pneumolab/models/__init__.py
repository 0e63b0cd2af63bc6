"""Models by name: a registry of architectures, one `Classifier` interface, heads, weight sources and freezing.

Example::

    from pneumolab.models import apply_freeze, create_model

    model = create_model("tf_efficientnet_lite0", weights="imagenet", head="linear", in_chans=1)
    apply_freeze(model, "plan")
    mean, std = model.spec.normalization(model.in_chans)
"""

from pneumolab.models._builders import imagenet_weights_available, load_imagenet_model
from pneumolab.models._classifier import Classifier
from pneumolab.models._errors import WeightsFileError, WeightsUnavailableError
from pneumolab.models._factory import create_model
from pneumolab.models._freeze import FREEZE_POLICIES, apply_freeze, count_parameters, set_frozen_batchnorm_eval
from pneumolab.models._heads import HEADS, AttentionHead, LinearHead, PlanHead, build_head
from pneumolab.models._registry import list_models, model_spec, register_model
from pneumolab.models._spec import FreezeGroup, ModelSpec

__all__ = [
    "FREEZE_POLICIES",
    "HEADS",
    "AttentionHead",
    "Classifier",
    "FreezeGroup",
    "LinearHead",
    "ModelSpec",
    "PlanHead",
    "WeightsFileError",
    "WeightsUnavailableError",
    "apply_freeze",
    "build_head",
    "count_parameters",
    "create_model",
    "imagenet_weights_available",
    "list_models",
    "load_imagenet_model",
    "model_spec",
    "register_model",
    "set_frozen_batchnorm_eval",
]
