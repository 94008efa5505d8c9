"""numpyro-pavi: Plate-Amortized Variational Inference (PAVI) as a NumPyro autoguide."""

from .autoguide import AutoPAVI
from .averaging import AverageParams, averaged_params
from .checkpoint import Checkpoint, fit, load_checkpoint, save_checkpoint
from .data import Ragged
from .encoders import SetEncoder
from .flows import ConditionalFlow
from .laplace import LaplaceWarning
from .monitor import DivergenceWarning, KeepBest, best_params, check_losses
from .structure import ModelStructure, model_structure

__version__ = "0.2.0"

__all__ = [
    "AutoPAVI",
    "AverageParams",
    "Checkpoint",
    "ConditionalFlow",
    "DivergenceWarning",
    "KeepBest",
    "LaplaceWarning",
    "ModelStructure",
    "Ragged",
    "SetEncoder",
    "averaged_params",
    "best_params",
    "check_losses",
    "fit",
    "load_checkpoint",
    "model_structure",
    "save_checkpoint",
]
