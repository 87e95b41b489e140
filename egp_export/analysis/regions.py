"""What each statistically rewritten site was decided to be: the record ``egp-export recheck`` re-measures.

A compile linearizes a site (every neuron replaced by the affine map of the
region it stayed in, or by an affine surrogate of a smooth activation) or
masks its dead neurons on the strength of the calibration data. Whether that
still holds on other data can be told without recompiling, from the original
model and this record: per rewritten site, the neurons rewritten, the region
each was decided in (piecewise-linear activations) and the affine map that
replaced it, or for a surrogate the largest deviation it was allowed.

``site_regions`` builds the record from the final sites and rewrites of a
compile (JSON-serialisable, report["regions"]); ``model_digest`` names the
weights it was decided for, so a recheck against another checkpoint is refused
rather than read as drift.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn as nn

from egp_export.analysis.plans import SitePlan
from egp_export.analysis.stats import SiteStats
from egp_export.records import Rewrite, RewriteKind

# The layout of report["regions"]; a recheck refuses a record of another format.
REGIONS_FORMAT = 1
LINEARIZED = "linearized"
DEAD_MASKED = "dead_masked"
_REWRITES = {RewriteKind.LINEARIZED: LINEARIZED, RewriteKind.DEAD_MASKED: DEAD_MASKED}


def model_digest(model: nn.Module) -> str:
    """SHA-256 of the model's parameters and buffers by name, floating tensors as float32.

    float32 because the compile works on a float32 copy of an fp16/bf16 model:
    the digest of the model a user passes and of the copy compiled agree.
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.float()
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def site_regions(
    sites: list[SiteStats], plans: dict[str, SitePlan], rewrites: list[Rewrite], *, model: nn.Module
) -> dict:
    """report["regions"]: the model's digest and one record per site a LINEARIZED or DEAD_MASKED rewrite changed.

    Each record: ``site`` (the call site's node name), ``form``/``target``,
    ``activation``, ``neuron_dim``, ``neurons`` (the site's neuron count),
    ``rewrite`` ("linearized" or "dead_masked"), ``rewritten`` (indices of the
    neurons rewritten: all of a linearized site, the dead ones of a masked
    site), ``slope`` and ``intercept`` per rewritten neuron (the map that
    replaced it: 0 and 0 for a dead neuron), ``min_margin`` (how close a
    rewritten neuron's inputs came to a boundary on the decide split; None for
    surrogates), and

    * piecewise-linear activations: ``boundaries`` and ``region`` per
      rewritten neuron (region r holds boundaries[r-1] < z <= boundaries[r]);
    * smooth activations (surrogates): ``allowed_error``, the largest
      deviation the compile accepted (tolerance x the site's output scale).

    What was decided is read from ``plans`` (the compile's SitePlans), never
    decided again.
    """
    kinds = {rewrite.nodes[0]: _REWRITES[rewrite.kind] for rewrite in rewrites if rewrite.kind in _REWRITES}
    records = [_record(site, plans[site.name], kinds[site.name]) for site in sites if site.name in kinds]
    return {"format": REGIONS_FORMAT, "model_digest": model_digest(model), "sites": records}


def _record(site: SiteStats, plan: SitePlan, rewrite: str) -> dict:
    record = {
        "site": site.name, "form": site.form, "target": site.target, "activation": site.spec.kind,
        "neuron_dim": site.dim, "neurons": site.num_neurons, "rewrite": rewrite,
    }
    if rewrite == DEAD_MASKED:
        rewritten = plan.dead_mask().nonzero().flatten()
        slope = intercept = torch.zeros(len(rewritten), dtype=torch.float64)
    else:
        rewritten = torch.arange(site.num_neurons)
        slope, intercept = plan.slope_tensor(), plan.shift_tensor()
    record["rewritten"] = rewritten.tolist()
    # The smallest distance of a rewritten neuron's inputs from its region's boundaries (none for surrogates).
    margins = site.margin[rewritten] if not site.spec.smooth and len(rewritten) else torch.zeros(0)
    record["min_margin"] = float(margins.min()) if margins.numel() else None
    record["slope"], record["intercept"] = slope.tolist(), intercept.tolist()
    if site.spec.smooth:
        record["allowed_error"] = plan.allowed_error
    else:
        record["boundaries"] = list(site.spec.boundaries)
        record["region"] = site.neuron_region[rewritten].tolist()
    return record
