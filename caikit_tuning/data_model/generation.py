"""Generation inputs that caikit.interfaces.nlp does not define."""

from enum import Enum

from caikit.core import DataObjectBase, dataobject
from py_to_proto.dataclass_to_proto import Annotated, FieldNumber

from .package import PACKAGE


@dataobject(package=PACKAGE)
class DecodingMethod(Enum):
    GREEDY = 0
    SAMPLING = 1


@dataobject(package=PACKAGE)
class ExponentialDecayLengthPenalty(DataObjectBase):
    """After `start_index` generated tokens, the EOS score grows by `decay_factor`
    per token, so long outputs are pushed to end."""

    start_index: Annotated[int, FieldNumber(1)]
    decay_factor: Annotated[float, FieldNumber(2)]
