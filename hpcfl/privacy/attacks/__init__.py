"""Gradient-inversion attacks: from what a client uploads, reconstruct its training images."""
from . import analytic
from .common import Knowledge, Problem, Reconstruction, gradient_from_update, idlg_label
from .dlg import dlg
from .gifd import gifd
from .ig import inverting_gradients

__all__ = ["analytic", "Knowledge", "Problem", "Reconstruction", "gradient_from_update",
           "idlg_label", "dlg", "gifd", "inverting_gradients"]
