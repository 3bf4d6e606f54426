"""Gradient-inversion attacks: from what a client uploads, reconstruct its training images."""
from . import analytic
from .common import Knowledge, Problem, Reconstruction, gradient_from_update, idlg_label
from .dlg import dlg
from .gifd import gifd
from .ig import inverting_gradients
from .plugin import Attack, attack_class

__all__ = ["Attack", "Knowledge", "Problem", "Reconstruction", "analytic", "attack_class",
           "gradient_from_update", "idlg_label", "dlg", "gifd", "inverting_gradients"]
