"""Estimators, one module each, registered by name for :func:`nlmefit.fit`."""
from nlmefit.estimators.base import REGISTRY, Estimator, get_estimator, register
from nlmefit.estimators.fo import FO
from nlmefit.estimators.foce import FOCE, FOCEI
from nlmefit.estimators.laplace import Laplace
from nlmefit.estimators.nuts import NUTS
from nlmefit.estimators.quadrature import AGQ
from nlmefit.estimators.saem import SAEM
from nlmefit.estimators.vem import VEM

__all__ = ["REGISTRY", "Estimator", "get_estimator", "register", "FO", "FOCE", "FOCEI", "Laplace", "AGQ", "SAEM",
           "NUTS", "VEM"]
