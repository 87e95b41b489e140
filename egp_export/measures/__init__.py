"""Layer and unit measures from the literature: PQ Index (SAP), energy statistics, distance correlation, CKA (ITPruner)."""

from egp_export.measures.cka import cka, itpruner_importance, similarity_matrix
from egp_export.measures.ckmeans import ckmeans
from egp_export.measures.energy import class_energy_score, distance_correlation, energy_distance
from egp_export.measures.layers import MEASURES, layer_measures, unit_scores
from egp_export.measures.pqi import pq_index, sap_prune_count
from egp_export.measures.widths import WidthCost, WidthPlan, itpruner_widths, model_macs, width_cost

__all__ = [
    "MEASURES",
    "WidthCost",
    "WidthPlan",
    "cka",
    "ckmeans",
    "class_energy_score",
    "distance_correlation",
    "energy_distance",
    "itpruner_importance",
    "itpruner_widths",
    "layer_measures",
    "model_macs",
    "pq_index",
    "sap_prune_count",
    "similarity_matrix",
    "unit_scores",
    "width_cost",
]
