"""The latent-variable model: parameters, residual error, structures, Model, and the named library."""
from nlmefit.models import examples, library
from nlmefit.models.error import ERROR_MODELS, ErrorModel, get_error_model
from nlmefit.models.model import Model, ModelData
from nlmefit.models.parameters import Omega, Param, ParameterSet, Params, fix
from nlmefit.models.structure import ClosedForm, FunctionStructure, OdeStructure, Structure

__all__ = ["examples", "library", "ERROR_MODELS", "ErrorModel", "get_error_model", "Model", "ModelData", "Omega",
           "Param", "Params", "ParameterSet", "fix", "ClosedForm", "FunctionStructure", "OdeStructure", "Structure"]
